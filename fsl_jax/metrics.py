"""Segmentation metrics, jit-able: everything is computed from confusion counts.

``confusion`` reduces binary predictions and ground truths to counts ``[..., 4]`` =
(true positives, false positives, false negatives, true negatives) of the foreground; the
scores are functions of such counts, so summing counts first (over pixels, images, the
episodes of a class) and scoring after gives the accumulated ("dataset") version of every
score, and scoring per image then averaging gives the per-image version.

A ratio whose denominator is zero is 1 where the prediction is exactly right (no false
positive and no false negative: predicting an empty mask for an empty ground truth) and 0
otherwise, so a score is never NaN.

Few-shot conventions (Shaban et al. 2017; Wang et al. 2019): mIoU is the foreground IoU of
each class, its counts accumulated over all episodes of the class, averaged over classes;
FB-IoU is the mean of the foreground and background IoU, counts accumulated over all episodes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

TP, FP, FN, TN = range(4)


def confusion(pred: jax.Array, target: jax.Array, axes=None) -> jax.Array:
    """Counts (tp, fp, fn, tn) of boolean (or {0, 1}) ``pred`` against ``target``, summed over ``axes``
    (default: all), as a float32 array ``[..., 4]``."""
    pred, target = jnp.asarray(pred).astype(bool), jnp.asarray(target).astype(bool)
    if pred.shape != target.shape:
        raise ValueError(f"pred has shape {pred.shape} but target has shape {target.shape}")
    count = lambda x: jnp.sum(x, axis=axes, dtype=jnp.float32)
    return jnp.stack([count(pred & target), count(pred & ~target), count(~pred & target), count(~pred & ~target)], -1)


def _ratio(num, den, counts):
    perfect = (counts[..., FP] + counts[..., FN]) == 0
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.where(perfect, 1.0, 0.0))


def iou(counts: jax.Array) -> jax.Array:
    """Foreground intersection over union: tp / (tp + fp + fn)."""
    return _ratio(counts[..., TP], counts[..., TP] + counts[..., FP] + counts[..., FN], counts)


def background_iou(counts: jax.Array) -> jax.Array:
    """Background intersection over union: tn / (tn + fp + fn)."""
    return _ratio(counts[..., TN], counts[..., TN] + counts[..., FP] + counts[..., FN], counts)


def fb_iou(counts: jax.Array) -> jax.Array:
    """Mean of foreground and background IoU."""
    return (iou(counts) + background_iou(counts)) / 2


def pixel_accuracy(counts: jax.Array) -> jax.Array:
    """(tp + tn) / all pixels."""
    return _ratio(counts[..., TP] + counts[..., TN], counts.sum(-1), counts)


def precision(counts: jax.Array) -> jax.Array:
    """tp / (tp + fp)."""
    return _ratio(counts[..., TP], counts[..., TP] + counts[..., FP], counts)


def recall(counts: jax.Array) -> jax.Array:
    """tp / (tp + fn)."""
    return _ratio(counts[..., TP], counts[..., TP] + counts[..., FN], counts)


def f1(counts: jax.Array) -> jax.Array:
    """2 tp / (2 tp + fp + fn), the harmonic mean of precision and recall (the Dice coefficient)."""
    return _ratio(2 * counts[..., TP], 2 * counts[..., TP] + counts[..., FP] + counts[..., FN], counts)


def per_class(counts: jax.Array, classes: jax.Array, num_classes: int) -> tuple[jax.Array, jax.Array]:
    """Counts ``[E, 4]`` of E episodes summed by class id ``[E]``: ``([num_classes, 4], episodes per class)``.

    Ids must lie in ``[0, num_classes)``: like ``jax.ops.segment_sum``, this drops episodes of other ids
    (it runs under ``jit``, where it cannot raise)."""
    summed = jax.ops.segment_sum(counts, classes, num_segments=num_classes)
    seen = jax.ops.segment_sum(jnp.ones_like(classes, jnp.float32), classes, num_segments=num_classes)
    return summed, seen


def mean_iou(counts: jax.Array, classes: jax.Array, num_classes: int) -> jax.Array:
    """Foreground IoU of each class over all its episodes, averaged over the classes that occur."""
    summed, seen = per_class(counts, classes, num_classes)
    present = seen > 0
    return jnp.sum(jnp.where(present, iou(summed), 0.0)) / jnp.maximum(present.sum(), 1)


def summary(counts: jax.Array, classes: jax.Array, num_classes: int) -> dict[str, jax.Array]:
    """Every score of a set of episodes (counts ``[E, 4]``, class ids ``[E]``): mIoU and FB-IoU by the
    few-shot conventions, the rest accumulated over all pixels, and the mean per-episode IoU."""
    total = counts.sum(0)
    return {"miou": mean_iou(counts, classes, num_classes), "fb_iou": fb_iou(total),
            "mean_episode_iou": jnp.mean(iou(counts)), "pixel_accuracy": pixel_accuracy(total),
            "precision": precision(total), "recall": recall(total), "f1": f1(total)}
