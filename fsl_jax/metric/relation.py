"""Relation Networks (Sung et al., CVPR 2018)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from fsl_jax.learner import Learner, accuracy, init_params
from fsl_jax.metric.common import embed_task, one_hot_support
from fsl_jax.nets.layers import BatchNorm, NormReluPool


class RelationModule(nn.Module):
    """Two conv blocks and two dense layers: a feature-map pair [h, w, 2c] -> relation score in (0, 1)."""

    width: int = 64
    hidden: int = 8

    @nn.compact
    def __call__(self, pairs):
        x = pairs
        for i in range(2):
            x = nn.Conv(self.width, (3, 3), padding="SAME", name=f"conv{i}")(x)
            if min(x.shape[1:3]) >= 2:  # small maps (a deeply pooled encoder) stop pooling at 1x1
                x = NormReluPool(name=f"norm{i}")(x)
            else:
                x = nn.relu(BatchNorm(name=f"norm{i}")(x))
        x = nn.relu(nn.Dense(self.hidden)(x.reshape(x.shape[0], -1)))
        return nn.sigmoid(nn.Dense(1)(x))[:, 0]


def relation(backbone, width: int = 64, hidden: int = 8, task_map: str = "vmap") -> Learner:
    """A learned comparison of each query's feature map with the mean support feature map of
    each class, trained by mean squared error to the one-hot target, as in the paper. The paper
    sums over shots; the mean is the same for one shot and lets a model trained with K shots be
    evaluated with another K. Use an encoder that keeps a spatial map, e.g. ``conv4`` with
    ``pooled_blocks: 2`` or ``3``."""
    module = RelationModule(width, hidden)

    def pairs(params, task):
        support, query = embed_task(backbone, params["backbone"], task, flatten=False)
        onehot = one_hot_support(task)
        classes = jnp.einsum("sn,shwc->nhwc", onehot / onehot.sum(0), support)  # mean over shots
        ways, queries = classes.shape[0], query.shape[0]
        grid = jnp.concatenate([jnp.broadcast_to(classes[None], (queries, *classes.shape)),
                                jnp.broadcast_to(query[:, None], (queries, ways, *query.shape[1:]))], -1)
        return grid.reshape(queries * ways, *grid.shape[2:]), (queries, ways)

    def init(rng, task):
        # two keys: both modules name their layers conv0, conv1, so one key would give them proportional kernels
        backbone_rng, relation_rng = jax.random.split(rng)
        params = {"backbone": init_params(backbone, backbone_rng, task.support_x)}
        grid, _ = pairs(params, task)
        params["relation"] = init_params(module, relation_rng, grid)
        return params

    def scores(params, task, rng):
        grid, shape = pairs(params, task)
        return module.apply({"params": params["relation"]}, grid).reshape(shape)

    def loss(params, task, rng):
        s = scores(params, task, rng)
        target = jnp.eye(s.shape[1])[task.query_y]
        return jnp.mean(jnp.square(s - target)), {"accuracy": accuracy(s, task.query_y)}

    return Learner(init=init, task_loss=loss, task_predict=scores, task_map=task_map)
