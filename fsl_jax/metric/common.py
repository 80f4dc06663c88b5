"""Pieces shared by the metric learners."""
from __future__ import annotations

import jax.numpy as jnp
import flax.linen as nn


def embed_task(backbone: nn.Module, params, task, flatten: bool = True):
    """Embed a task's support and query images in one pass (one set of batch statistics)."""
    images = jnp.concatenate([task.support_x, task.query_x])
    features = backbone.apply({"params": params}, images)
    if flatten:
        features = features.reshape(features.shape[0], -1)
    split = task.support_x.shape[0]
    return features[:split], features[split:]


def one_hot_support(task):
    """[N*K, N] one-hot support labels; N is static (the task's ``classes`` length)."""
    return jnp.eye(task.classes.shape[-1], dtype=jnp.float32)[task.support_y]


def class_means(features, task):
    """Per-way mean of support features: [N, D]."""
    onehot = one_hot_support(task)
    return (onehot.T @ features) / onehot.sum(0)[:, None]


def per_class_max(scores, task):
    """Reduce [Q, N*K] query-support scores to [Q, N] by the best shot of each way."""
    ways = task.classes.shape[-1]
    masked = jnp.where(one_hot_support(task).T[None] > 0, scores[:, None, :], -jnp.inf)
    return masked.max(-1).reshape(scores.shape[0], ways)
