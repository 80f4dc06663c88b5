"""Prototypical Networks (Snell, Swersky and Zemel, NeurIPS 2017)."""
from __future__ import annotations

import jax.numpy as jnp

from fsl_jax.errors import ConfigError, check_positive
from fsl_jax.learner import Learner, cross_entropy, init_params
from fsl_jax.metric.common import class_means, embed_task


def squared_distances(queries, prototypes):
    """||q - p||^2 for every pair, as one matrix product."""
    return (jnp.sum(queries**2, -1)[:, None] - 2 * queries @ prototypes.T + jnp.sum(prototypes**2, -1)[None])


def protonet(backbone, distance: str = "sqeuclidean", scale: float = 10.0, task_map: str = "vmap") -> Learner:
    """Queries are classified by distance to the mean support embedding of each class.

    distance: "sqeuclidean" (the paper's choice) or "cosine", whose logits are ``scale`` times the
    cosine similarity (a cosine in [-1, 1] alone cannot make a confident softmax).
    """
    if distance not in ("sqeuclidean", "cosine"):
        raise ConfigError(f"distance must be 'sqeuclidean' or 'cosine', got {distance!r}")
    check_positive("scale", scale)

    def logits(params, task, rng):
        support, query = embed_task(backbone, params, task)
        prototypes = class_means(support, task)
        if distance == "cosine":
            normalise = lambda v: v / jnp.linalg.norm(v, axis=-1, keepdims=True).clip(1e-8)
            return scale * normalise(query) @ normalise(prototypes).T
        return -squared_distances(query, prototypes)

    def loss(params, task, rng):
        return cross_entropy(logits(params, task, rng), task.query_y)

    return Learner(init=lambda rng, task: init_params(backbone, rng, task.support_x),
                   task_loss=loss, task_predict=logits, task_map=task_map)
