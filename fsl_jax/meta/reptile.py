"""Reptile (Nichol, Achiam and Schulman, 2018) as a :class:`~fsl_jax.learner.Learner`.

Reptile moves the initialisation toward the weights adapted to each task:
``params += eps * mean_tasks(adapted - params)``. To run in the generic training loop
(``jax.grad`` of ``Learner.loss``, then the config's optax optimiser), ``task_loss`` returns
a surrogate whose *gradient* is ``params - adapted`` (the adapted weights held constant),
while its *value* is the query loss after adaptation, so logs and the NaN check stay
meaningful. With ``optax.sgd(eps)`` as the outer optimiser this is exactly the batched
Reptile update; with Adam it is the variant Nichol et al. also use.

The inner loop is SGD on the support set (as at test time), the adapted weights are
first-order by construction, and the model, BatchNorm options and parameter layout are
those of :func:`fsl_jax.meta.maml` (``{"model": {"backbone", "head"}}``). Only the support set
teaches: the query set gives the logged loss and nothing else. Nichol et al. have no
support/query split and train on more shots than they test with (10 on Omniglot), so sample
training episodes with many shots and few queries (``episode.shots`` above ``eval.shots``), as
the configs in ``experiments/omniglot`` do.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fsl_jax.errors import ConfigError
from fsl_jax.learner import Learner, cross_entropy
from fsl_jax.meta.maml import _Classifier
from fsl_jax.meta.parallel import default_task_map


def reptile(backbone, inner_steps: int = 5, test_inner_steps: int | None = 10, inner_lr: float = 0.1,
            adapted: str = "all", batch_stats: str = "query", unroll: int | bool = True,
            task_map: str | None = None) -> Learner:
    """Reptile; options as :func:`fsl_jax.meta.maml` (the outer step size is the optimiser's), except that
    every parameter adapts: Reptile's update moves only what adapted, so with ``adapted="head"`` the
    backbone would never train."""
    if adapted != "all":
        raise ConfigError(f"Reptile adapts every parameter (adapted='all'): its update moves only what adapted, "
                          f"so the backbone would never train; got adapted={adapted!r}")
    core = _Classifier(backbone, inner_steps, test_inner_steps, inner_lr, adapted, batch_stats, unroll)

    def task_loss(params, task, rng):
        model = jax.lax.stop_gradient(params["model"])
        adapted_model = core.adapt(model, task, core.inner_steps, inner_lr, True, core.unroll)
        loss, metrics = cross_entropy(core.query_logits(adapted_model, task), task.query_y)
        pull = sum(0.5 * jnp.sum(jnp.square(p - a)) for p, a in
                   zip(jax.tree.leaves(params["model"]), jax.tree.leaves(adapted_model)))
        return loss + pull - jax.lax.stop_gradient(pull), metrics

    def task_predict(params, task, rng):
        return core.query_logits(core.adapt(params["model"], task, core.test_inner_steps, inner_lr, True), task)

    return Learner(init=lambda rng, task: {"model": core.init_model(rng, task)}, task_loss=task_loss,
                   task_predict=task_predict, task_map=task_map or default_task_map())
