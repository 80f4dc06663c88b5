"""Prototype segmenter: masked average pooling and cosine similarity, with PANet's alignment loss.

Each support image's features pooled under its mask (and under its complement), averaged over
the shots, give a foreground and a background prototype; every query pixel is scored by the
scaled cosine similarity to each (Wang et al., ICCV 2019, PANet; masked average pooling as in
Zhang et al. 2018 SG-One). The optional prototype alignment regularisation turns the roles
around: prototypes pooled from the queries under their own prediction (all queries together, as
PANet's alignment pools them) must segment the support.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fsl_jax.errors import ConfigError, check_positive
from fsl_jax.learner import Learner, init_params
from fsl_jax.seg.common import (bce, check_segmenter, contrastive_batch_loss, cosine, masked_average, resize,
                                segmentation_loss, shot_average)


def prototypes(features: jax.Array, masks: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(foreground, background) prototypes of features [N, h, w, D] under masks [N, h', w'], one per
    image averaged over the N images, as PANet pools its shots."""
    weights = resize(masks[..., None], *features.shape[1:3])[..., 0]
    return shot_average(features, weights), shot_average(features, 1.0 - weights)


def scores(features: jax.Array, foreground: jax.Array, background: jax.Array, scale: float) -> jax.Array:
    """Per-pixel logits [..., h, w]: ``scale`` x (cosine to the foreground - cosine to the background prototype)."""
    return scale * (cosine(features, foreground) - cosine(features, background))


def prototype_segmenter(backbone: nn.Module, scale: float = 20.0, align_weight: float = 1.0, dice_weight: float = 1.0,
                        contrast_weight: float = 0.0, temperature: float = 0.1, threshold: float = 0.5,
                        task_map: str = "vmap") -> Learner:
    """A few-shot segmenter on a fully convolutional ``backbone`` (e.g. Conv4 with ``pooled_blocks: 2``).

    scale: the cosine similarities' temperature (PANet uses 20); the foreground logit of a
        pixel is ``scale * (cos(f, fg) - cos(f, bg))``, the two-class softmax as one sigmoid.
    align_weight: weight of the prototype alignment loss (0 turns it off).
    dice_weight: weight of a soft Dice term beside the cross-entropy (small objects; 0: PANet's loss).
    contrast_weight: weight of a contrastive term across the batch's tasks (each task's foreground
        prototype against the queries' targets, :func:`fsl_jax.seg.common.contrastive_batch_loss`; 0: off).
    temperature: that term's softmax temperature on cosine similarities.
    threshold: a pixel counts as foreground in the training metrics (iou, accuracy) where its
        probability exceeds this (configs: ``eval.threshold``, so training and held-out scores agree).
    """
    check_positive("scale", scale)
    check_segmenter(threshold, align_weight=align_weight, dice_weight=dice_weight, contrast_weight=contrast_weight)

    def embed(params, task):
        """Support and query features; one pass (one set of BatchNorm statistics) when sizes agree."""
        apply = lambda x: backbone.apply({"params": params}, x)
        if task.support_x.shape[1:] == task.query_x.shape[1:]:
            features = apply(jnp.concatenate([task.support_x, task.query_x]))
            return features[: task.support_x.shape[0]], features[task.support_x.shape[0]:]
        return apply(task.support_x), apply(task.query_x)

    def predict(params, task, rng):
        support, query = embed(params, task)
        logits = scores(query, *prototypes(support, task.support_mask), scale)
        return resize(logits[..., None], *task.query_x.shape[1:3])[..., 0]

    def task_terms(params, task, rng):
        support, query = embed(params, task)
        foreground, background = prototypes(support, task.support_mask)
        coarse = scores(query, foreground, background, scale)
        logits = resize(coarse[..., None], *task.query_x.shape[1:3])[..., 0]
        loss, metrics = segmentation_loss(logits, task.query_mask, dice_weight, threshold)
        if align_weight:
            predicted = jax.lax.stop_gradient((coarse > 0).astype(jnp.float32))
            back = scores(support, masked_average(query, predicted), masked_average(query, 1.0 - predicted), scale)
            align = bce(resize(back[..., None], *task.support_x.shape[1:3])[..., 0], task.support_mask)
            loss = loss + align_weight * align
            metrics = {**metrics, "align_loss": align}
        return loss, metrics, foreground, prototypes(query, task.query_mask)[0]

    def init(rng, task):
        params = init_params(backbone, rng, task.query_x)
        features = jax.eval_shape(lambda p, x: backbone.apply({"params": p}, x), params, task.query_x)
        if features.shape[-1] < 2:  # the cosine of one-channel features is +-1: every logit would be 0
            raise ConfigError(f"the prototype segmenter needs features of at least 2 channels, its backbone gives "
                              f"{features.shape[-1]} (unet: raise backbone_options.outputs)")
        return params

    return Learner(init=init,
                   task_loss=lambda params, task, rng: task_terms(params, task, rng)[:2], task_predict=predict,
                   task_map=task_map,
                   batch_loss=contrastive_batch_loss(task_terms, task_map, contrast_weight, temperature))
