"""A variant of the Siamese-U-Net (Michaelis, Bethge and Ecker, ICML 2018): one-shot segmentation in clutter.

One encoder, shared, reads the exemplar and the scene. The exemplar's code (its
bottleneck features averaged over positions, and over shots when there are several)
is matched against every position of the scene's bottleneck by an elementwise product,
normalised, and decoded by a U-Net decoder with skip connections from the scene's encoder.
The published model differs: it has two encoders with their own weights (the scene's dilated,
not pooled, in its last blocks) and matches by correlation, each scene position's dot product
with the exemplar's code scaling that code. Support images are multiplied by
their masks before encoding: an identity for the clutter protocol's exemplar (a character
on black), and what makes a support scene with clutter usable as an exemplar.

Pixel-wise losses teach such a model to segment every character long before they teach it to
tell the exemplar's character from the others. An optional contrastive term (``contrast_weight``,
:func:`fsl_jax.seg.common.contrastive_batch_loss`) gives the encoder that signal directly: each
exemplar's code must be closer to its own target's code in the scene (the scene's bottleneck
features averaged under the target's mask) than to the other tasks' targets in the batch.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from fsl_jax.learner import Learner, init_params
from fsl_jax.nets.decoders import UNetDecoder, UNetEncoder, image_norm
from fsl_jax.seg.common import check_segmenter, contrastive_batch_loss, masked_average, resize, segmentation_loss


class SiameseUNet(nn.Module):
    """(support_x [K, h, w, C], support_mask [K, h, w], query_x [Q, H, W, C]) -> (query logits [Q, H, W],
    the exemplar's code [D], the scene's bottleneck features [Q, H', W', D])."""

    widths: Sequence[int] = (16, 32, 64, 128)
    upsample: str = "bilinear"

    @nn.compact
    def __call__(self, support_x, support_mask, query_x):
        encoder = UNetEncoder(self.widths, name="encoder")
        code, _ = encoder(support_x * support_mask[..., None])
        code = code.mean(axis=(0, 1, 2))
        features, skips = encoder(query_x)
        matched = image_norm("match_norm")(features * code)
        return UNetDecoder(self.upsample, name="decoder")(matched, skips)[..., 0], code, features


def siamese_unet(widths: Sequence[int] = (16, 32, 64, 128), upsample: str = "bilinear", dice_weight: float = 1.0,
                 contrast_weight: float = 0.0, temperature: float = 0.1, threshold: float = 0.5,
                 task_map: str = "vmap") -> Learner:
    """The Siamese-U-Net variant (shared encoder, elementwise matching) as a :class:`Learner`, trained with
    pixel-wise binary cross-entropy.

    widths: encoder block widths (the decoder mirrors them); 2x2 pooling between blocks.
    upsample: "bilinear" or "transpose" (transposed convolutions) in the decoder.
    dice_weight: weight of a soft Dice term added to the loss (0: cross-entropy alone, as published).
    contrast_weight: weight of the contrastive term across the batch's tasks (0: off, as published).
    temperature: the contrastive term's softmax temperature on cosine similarities.
    threshold: a pixel counts as foreground in the training metrics (iou, accuracy) where its
        probability exceeds this (configs: ``eval.threshold``, so training and held-out scores agree).
    """
    check_segmenter(threshold, dice_weight=dice_weight, contrast_weight=contrast_weight)
    net = SiameseUNet(tuple(widths), upsample)

    def predict(params, task, rng):
        return net.apply({"params": params}, task.support_x, task.support_mask, task.query_x)[0]

    def task_terms(params, task, rng):
        logits, code, features = net.apply({"params": params}, task.support_x, task.support_mask, task.query_x)
        loss, metrics = segmentation_loss(logits, task.query_mask, dice_weight, threshold)
        target = masked_average(features, resize(task.query_mask[..., None], *features.shape[1:3])[..., 0])
        return loss, metrics, code, target

    return Learner(init=lambda rng, task: init_params(net, rng, task.support_x, task.support_mask, task.query_x),
                   task_loss=lambda params, task, rng: task_terms(params, task, rng)[:2], task_predict=predict,
                   task_map=task_map,
                   batch_loss=contrastive_batch_loss(task_terms, task_map, contrast_weight, temperature))
