"""The one interface every few-shot method implements.

A :class:`Learner` is three pure functions of an explicit Flax parameter pytree. Methods
write them for one task (an :class:`~fsl_jax.data.episodes.Episode` without its leading
task axis); :meth:`Learner.loss` and :meth:`Learner.predict` map them over a batch of tasks
with ``jax.vmap`` or ``jax.lax.map``, so the result can be jitted, vmapped again or sharded
from outside.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from fsl_jax.errors import ConfigError

Params = Any
Metrics = dict[str, jax.Array]
TASK_MAPS = ("vmap", "map", "unroll")


def check_task_map(how: str) -> None:
    if how not in TASK_MAPS:
        raise ConfigError(f"task_map must be one of {TASK_MAPS}, got {how!r}")


def init_params(module, rng, *args) -> Params:
    """``module.init(rng, *args)["params"]``, refusing a module that keeps other state: a learner's
    parameters are its whole state, so BatchNorm must be :class:`fsl_jax.nets.BatchNorm` (each
    batch's own statistics), not ``flax.linen.BatchNorm`` (running averages in ``batch_stats``)."""
    variables = module.init(rng, *args)
    other = sorted(set(variables) - {"params"})
    if other:
        raise ConfigError(f"{type(module).__name__} keeps variables outside 'params' ({other}): fsl_jax learners "
                          "carry parameters only; use fsl_jax.nets.BatchNorm (each batch's own statistics) for "
                          "flax.linen.BatchNorm, and keep no other mutable state")
    return variables.get("params", {})


def map_tasks(fn: Callable, how: str) -> Callable:
    """Apply ``fn(params, task, rng)`` to every task of a batch: ``vmap`` (one batched program),
    ``map`` (``lax.map``: one task at a time) or ``unroll`` (each task traced on its own: a
    program as many times larger, whose independent tasks XLA's CPU runtime runs side by side
    on its threads; faster on CPU for small task batches, slower to compile)."""
    check_task_map(how)

    def mapped(params, batch, rng):
        rngs = jax.random.split(rng, jax.tree.leaves(batch)[0].shape[0])
        if how == "vmap":
            return jax.vmap(fn, in_axes=(None, 0, 0))(params, batch, rngs)
        if how == "unroll":
            outs = [fn(params, jax.tree.map(lambda x: x[i], batch), rngs[i]) for i in range(len(rngs))]
            return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
        return jax.lax.map(lambda args: fn(params, *args), (batch, rngs))

    return mapped


@dataclasses.dataclass(frozen=True)
class Learner:
    """A few-shot method.

    init(rng, task) -> params
    task_loss(params, task, rng) -> (loss, metrics)   metrics include "accuracy"
    task_predict(params, task, rng) -> logits [N*Q, N] for the task's queries
    batch_loss(params, batch, rng) -> (loss, metrics), optional: the training loss of a whole batch,
        for methods whose loss couples the batch's tasks (e.g. a contrastive term across them);
        without it the loss is the mean of ``task_loss`` over the tasks.
    """

    init: Callable[..., Params]
    task_loss: Callable[..., tuple[jax.Array, Metrics]]
    task_predict: Callable[..., jax.Array]
    task_map: str = "vmap"
    batch_loss: Callable[..., tuple[jax.Array, Metrics]] | None = None

    def __post_init__(self):  # a bad task_map is named when the learner is built, not at its first trace
        check_task_map(self.task_map)

    def loss(self, params: Params, batch, rng) -> tuple[jax.Array, Metrics]:
        """Loss and metrics of a batch of tasks: ``batch_loss``, or the mean of ``task_loss`` over the tasks."""
        if self.batch_loss is not None:
            return self.batch_loss(params, batch, rng)
        losses, metrics = map_tasks(self.task_loss, self.task_map)(params, batch, rng)
        return jnp.mean(losses), jax.tree.map(jnp.mean, metrics)

    def predict(self, params: Params, batch, rng) -> jax.Array:
        """Query logits [T, N*Q, N] for every task of the batch."""
        return map_tasks(self.task_predict, self.task_map)(params, batch, rng)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(logits, -1) == labels)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, Metrics]:
    """Mean softmax cross-entropy and accuracy: the loss of most classifiers here."""
    loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1))
    return loss, {"accuracy": accuracy(logits, labels)}


def first_task(batch):
    """The first task of a batch, for ``init``."""
    return jax.tree.map(lambda x: x[0], batch)
