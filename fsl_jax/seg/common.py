"""Pieces shared by the segmenters: the pixel-wise loss, training metrics, masked average pooling."""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from fsl_jax import metrics
from fsl_jax.errors import check_positive, check_probability, check_weight
from fsl_jax.learner import Metrics, map_tasks


def bce(logits: jax.Array, masks: jax.Array) -> jax.Array:
    """Mean pixel-wise binary cross-entropy of foreground logits against {0, 1} masks."""
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, masks))


def soft_dice(logits: jax.Array, masks: jax.Array) -> jax.Array:
    """Mean over images [..., H, W] of 1 - soft Dice coefficient (Milletari et al., 2016) of the
    foreground probabilities: insensitive to how small the foreground is, unlike cross-entropy."""
    prob = jax.nn.sigmoid(logits)
    overlap = jnp.sum(prob * masks, (-2, -1))
    return jnp.mean(1.0 - (2.0 * overlap + 1.0) / (jnp.sum(prob, (-2, -1)) + jnp.sum(masks, (-2, -1)) + 1.0))


def segmentation_loss(logits: jax.Array, masks: jax.Array, dice_weight: float = 0.0,
                      threshold: float = 0.5) -> tuple[jax.Array, Metrics]:
    """Binary cross-entropy (plus ``dice_weight`` x soft Dice) of query logits [Q, H, W], with the mean
    per-image IoU and the pixel accuracy of the prediction (probability above ``threshold``) as metrics."""
    counts = metrics.confusion(logits > logit(threshold), masks > 0.5, axes=(-2, -1))
    loss = bce(logits, masks) + (dice_weight * soft_dice(logits, masks) if dice_weight else 0.0)
    return loss, {"iou": jnp.mean(metrics.iou(counts)), "accuracy": metrics.pixel_accuracy(counts.sum(0))}


def logit(probability: float) -> float:
    """log(p / (1 - p)): a logit exceeds it exactly where its probability exceeds ``p``."""
    check_probability("threshold", probability)
    return math.log(probability / (1 - probability))


def check_segmenter(threshold: float, **weights: float) -> None:
    """A segmenter's options, each named when it is wrong: the metrics' ``threshold`` a probability and
    the loss terms' ``weights`` (by name) at least 0."""
    check_probability("threshold", threshold)
    for name, weight in weights.items():
        check_weight(name, weight)


def resize(x: jax.Array, height: int, width: int) -> jax.Array:
    """Bilinear resize of [..., h, w, C] to [..., height, width, C]."""
    return jax.image.resize(x, (*x.shape[:-3], height, width, x.shape[-1]), "bilinear")


def masked_average(features: jax.Array, weights: jax.Array) -> jax.Array:
    """Masked average pooling: sum of features [..., h, w, D] weighted by [..., h, w] over all but the
    last axis, divided by the total weight (kept away from zero, so an empty mask gives zeros, not NaN)."""
    axes = tuple(range(features.ndim - 1))
    return jnp.sum(features * weights[..., None], axes) / jnp.maximum(jnp.sum(weights), 1e-6)


def shot_average(features: jax.Array, weights: jax.Array) -> jax.Array:
    """PANet's prototype (Wang et al. 2019): the masked average of each shot's features [K, h, w, D]
    under its weights [K, h, w], then the mean over the K shots, so that every shot counts alike
    whatever the size of its object (an empty shot adds zeros, as in PANet)."""
    return jnp.mean(jax.vmap(masked_average)(features, weights), 0)


def cosine(features: jax.Array, prototype: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Cosine similarity of every feature vector [..., D] with a prototype [D]; finite (with finite
    gradients) for zero vectors."""
    norm = lambda v: jnp.sqrt(jnp.sum(v * v, -1) + eps * eps)
    return (features @ prototype) / (norm(features) * norm(prototype))


def contrastive_batch_loss(task_terms, task_map: str, weight: float, temperature: float) -> Callable | None:
    """A batch loss that couples the tasks: the mean task loss plus ``weight`` x InfoNCE (van den Oord et
    al. 2018) across the batch, where each task's support code must be closer (cosine / ``temperature``)
    to its own query target's code than to the targets of the tasks of other classes, as in a
    prototypical network's episode. Another task of the same class (``batch.classes``) is no negative:
    its target is the same object, so it is left out of the softmax and of ``contrast_accuracy``.

    Pixel-wise losses teach a segmenter to segment every object long before they teach it to tell the
    support's object from the others; this term gives its features that signal directly.
    task_terms(params, task, rng) -> (loss, metrics, support code [D], query target code [D]).
    None where ``weight`` is 0: no term, so the learner's loss is its mean task loss. ``temperature`` is
    checked either way, so that a config is right or wrong whatever its weight.
    """
    check_positive("temperature", temperature)
    if not weight:
        return None

    def batch_loss(params, batch, rng):
        losses, task_metrics, codes, targets = map_tasks(task_terms, task_map)(params, batch, rng)
        unit = lambda v: v / jnp.sqrt(jnp.sum(v * v, -1, keepdims=True) + 1e-12)
        labels = jnp.arange(codes.shape[0])
        valid = (batch.classes[:, None] != batch.classes[None, :]) | jnp.eye(len(labels), dtype=bool)
        similarity = jnp.where(valid, unit(codes) @ unit(targets).T / temperature, -jnp.inf)
        contrast = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(similarity, labels))
        return jnp.mean(losses) + weight * contrast, {
            **jax.tree.map(jnp.mean, task_metrics), "contrast_loss": contrast,
            "contrast_accuracy": jnp.mean(jnp.argmax(similarity, -1) == labels)}

    return batch_loss
