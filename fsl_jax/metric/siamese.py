"""Siamese networks for one-shot recognition (Koch, Zemel and Salakhutdinov, ICML-W 2015)."""
from __future__ import annotations

import jax.numpy as jnp
import flax.linen as nn
import optax

from fsl_jax.errors import ConfigError
from fsl_jax.learner import Learner, accuracy, init_params
from fsl_jax.metric.common import embed_task, per_class_max


def siamese(backbone, loss: str = "binary", margin: float = 1.0, task_map: str = "vmap") -> Learner:
    """Pair verification between every query and every support image.

    loss="binary": a learned weighted L1 distance -> logit, binary cross-entropy (Koch et al.).
    loss="contrastive": Euclidean distance d, y d^2 + (1-y) max(0, margin-d)^2 (Hadsell et al., 2006).
    Positive and negative pairs are weighted equally (an N-way episode has N-1 negatives per positive).
    Classification: each query takes the class of its best-scoring support.
    """
    if loss not in ("binary", "contrastive"):
        raise ConfigError(f"loss must be 'binary' or 'contrastive', got {loss!r}")
    head = nn.Dense(1)

    def pair_scores(params, task):
        support, query = embed_task(backbone, params["backbone"], task)
        if loss == "binary":
            diff = jnp.abs(query[:, None] - support[None])
            return head.apply({"params": params["head"]}, diff)[..., 0]
        return -jnp.sqrt(jnp.sum(jnp.square(query[:, None] - support[None]), -1) + 1e-9)

    def init(rng, task):
        params = {"backbone": init_params(backbone, rng, task.support_x)}
        if loss == "binary":
            support, _ = embed_task(backbone, params["backbone"], task)
            params["head"] = init_params(head, rng, support)
        return params

    def predict(params, task, rng):
        return per_class_max(pair_scores(params, task), task)

    def task_loss(params, task, rng):
        scores = pair_scores(params, task)
        same = (task.query_y[:, None] == task.support_y[None]).astype(jnp.float32)
        if loss == "binary":
            per_pair = optax.sigmoid_binary_cross_entropy(scores, same)
        else:
            d = -scores
            per_pair = same * d**2 + (1 - same) * jnp.maximum(margin - d, 0.0) ** 2
        balanced = 0.5 * (jnp.sum(per_pair * same) / jnp.sum(same) + jnp.sum(per_pair * (1 - same)) / jnp.sum(1 - same))
        return balanced, {"accuracy": accuracy(per_class_max(scores, task), task.query_y)}

    return Learner(init=init, task_loss=task_loss, task_predict=predict, task_map=task_map)
