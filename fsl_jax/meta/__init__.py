"""Gradient-based meta-learners: MAML, FOMAML, ANIL, Meta-SGD and Reptile.

:func:`adapt` is the inner loop for any model (a function of a parameter pytree plus a
loss); :func:`maml` and :func:`reptile` turn it into few-shot classifiers;
:mod:`fsl_jax.meta.parallel` spreads a task batch, or evaluation's batches, over devices.
"""
from fsl_jax.meta.adapt import adapt, param_mask
from fsl_jax.meta.maml import MetaClassifier, maml
from fsl_jax.meta.parallel import default_task_map, map_batches, replicate, shard_tasks, sharded_loss, task_mesh
from fsl_jax.meta.reptile import reptile

__all__ = ["MetaClassifier", "adapt", "default_task_map", "maml", "map_batches", "param_mask", "replicate", "reptile",
           "shard_tasks", "sharded_loss", "task_mesh"]
