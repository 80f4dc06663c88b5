"""The transfer baseline: pre-train on all base classes, then fit a linear head on frozen
support features ("Baseline", Chen et al., ICLR 2019)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn
import optax

from fsl_jax.errors import check_count, check_positive
from fsl_jax.learner import Learner, cross_entropy, init_params
from fsl_jax.metric.common import embed_task, one_hot_support


def fit_linear_head(support, onehot, steps: int, learning_rate: float):
    """Multinomial logistic regression on fixed features by full-batch Adam: (W [D, N], b [N])."""
    optimiser = optax.adam(learning_rate)
    head = (jnp.zeros((support.shape[-1], onehot.shape[-1])), jnp.zeros(onehot.shape[-1]))

    def objective(head):
        logits = support @ head[0] + head[1]
        return jnp.mean(optax.softmax_cross_entropy(logits, onehot))

    def step(_, carry):
        head, state = carry
        updates, state = optimiser.update(jax.grad(objective)(head), state)
        return optax.apply_updates(head, updates), state

    head, _ = jax.lax.fori_loop(0, steps, step, (head, optimiser.init(head)))
    return head


def transfer(backbone, num_train_classes: int, head_steps: int = 100, head_lr: float = 0.01,
             task_map: str = "vmap") -> Learner:
    """Training is plain classification of every episode image into the ``num_train_classes``
    base classes; prediction freezes the features (unit-normalised) and fits a new linear head
    on the support set only."""
    check_positive("head_lr", head_lr)
    check_count("head_steps", head_steps)
    classifier = nn.Dense(num_train_classes)

    def init(rng, task):
        params = {"backbone": init_params(backbone, rng, task.support_x)}
        support, _ = embed_task(backbone, params["backbone"], task)
        params["head"] = init_params(classifier, rng, support)
        return params

    def task_loss(params, task, rng):
        support, query = embed_task(backbone, params["backbone"], task)
        features = jnp.concatenate([support, query])
        labels = task.classes[jnp.concatenate([task.support_y, task.query_y])]
        return cross_entropy(classifier.apply({"params": params["head"]}, features), labels)

    def predict(params, task, rng):
        support, query = jax.lax.stop_gradient(embed_task(backbone, params["backbone"], task))
        normalise = lambda v: v / jnp.linalg.norm(v, axis=-1, keepdims=True).clip(1e-8)
        w, b = fit_linear_head(normalise(support), one_hot_support(task), head_steps, head_lr)
        return normalise(query) @ w + b

    return Learner(init=init, task_loss=task_loss, task_predict=predict, task_map=task_map)
