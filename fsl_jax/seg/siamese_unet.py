"""Siamese-U-Net (Michaelis, Bethge and Ecker, ICML 2018): one-shot segmentation in clutter.

One encoder, shared, reads the exemplar and the scene. The exemplar's code (its
bottleneck features averaged over positions, and over shots when there are several)
is matched against every position of the scene's bottleneck by an elementwise product
(the published model's depthwise matching filter), normalised, and decoded by a U-Net
decoder with skip connections from the scene's encoder. Support images are multiplied by
their masks before encoding: an identity for the clutter protocol's exemplar (a character
on black), and what makes a support scene with clutter usable as an exemplar.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from fsl_jax.learner import Learner
from fsl_jax.nets.decoders import UNetDecoder, UNetEncoder, image_norm
from fsl_jax.seg.common import segmentation_loss


class SiameseUNet(nn.Module):
    """(support_x [K, h, w, C], support_mask [K, h, w], query_x [Q, H, W, C]) -> query logits [Q, H, W]."""

    widths: Sequence[int] = (16, 32, 64, 128)
    upsample: str = "bilinear"

    @nn.compact
    def __call__(self, support_x, support_mask, query_x):
        encoder = UNetEncoder(self.widths, name="encoder")
        code, _ = encoder(support_x * support_mask[..., None])
        code = code.mean(axis=(0, 1, 2))
        features, skips = encoder(query_x)
        matched = image_norm("match_norm")(features * code)
        return UNetDecoder(self.upsample, name="decoder")(matched, skips)[..., 0]


def siamese_unet(widths: Sequence[int] = (16, 32, 64, 128), upsample: str = "bilinear", dice_weight: float = 1.0,
                 task_map: str = "vmap") -> Learner:
    """The Siamese-U-Net as a :class:`Learner`, trained with pixel-wise binary cross-entropy.

    widths: encoder block widths (the decoder mirrors them); 2x2 pooling between blocks.
    upsample: "bilinear" or "transpose" (transposed convolutions) in the decoder.
    dice_weight: weight of a soft Dice term added to the loss (0: cross-entropy alone, as published).
    """
    net = SiameseUNet(tuple(widths), upsample)

    def predict(params, task, rng):
        return net.apply({"params": params}, task.support_x, task.support_mask, task.query_x)

    return Learner(init=lambda rng, task: net.init(rng, task.support_x, task.support_mask, task.query_x)["params"],
                   task_loss=lambda params, task, rng: segmentation_loss(predict(params, task, rng), task.query_mask, dice_weight),
                   task_predict=predict, task_map=task_map)
