"""Matching Networks (Vinyals et al., NeurIPS 2016)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from fsl_jax.errors import check_count, check_positive
from fsl_jax.learner import Learner, accuracy, init_params
from fsl_jax.metric.common import embed_task, one_hot_support


def _normalise(v):
    return v / jnp.linalg.norm(v, axis=-1, keepdims=True).clip(1e-8)


class FullContextEmbedding(nn.Module):
    """Full-context embeddings. g: the support through a bidirectional LSTM, plus a skip.
    f: each query refined for ``steps`` reads by an LSTM that attends over g; the read-out is
    added to the hidden state, as in common re-implementations, rather than concatenated."""

    steps: int = 4

    @nn.compact
    def __call__(self, support, query):
        dim = support.shape[-1]
        bidir = nn.Bidirectional(nn.RNN(nn.LSTMCell(dim)), nn.RNN(nn.LSTMCell(dim)), merge_fn=jnp.add)
        # zero initial states computed from the support, so that they vary across devices where it
        # does: flax's constant zeros fail the scan's carry type check under shard_map
        zero = 0.0 * support[:1]
        g = support + bidir(support[None], initial_carry=((zero, zero), (zero, zero)))[0]
        cell = nn.LSTMCell(dim, name="attention_lstm")
        c, h = jnp.zeros_like(query), jnp.zeros_like(query)
        readout = jnp.zeros_like(query)
        for _ in range(self.steps):
            (c, h), _ = cell((c, h + readout), query)
            h = h + query
            readout = jax.nn.softmax(h @ g.T, -1) @ g
        return g, h


def matching(backbone, full_context: bool = False, fce_steps: int = 4, scale: float = 1.0,
             task_map: str = "vmap") -> Learner:
    """Queries attend over the support set by cosine similarity; class probabilities are the
    attention mass on each class's supports.

    scale: multiplies the cosine similarities before the softmax. 1 is the paper; with
    similarities in [-1, 1] the attention can then never be confident, which slows learning,
    so larger values (a fixed temperature, as in later re-implementations) train faster.
    """
    check_count("fce_steps", fce_steps)
    check_positive("scale", scale)
    fce = FullContextEmbedding(fce_steps)

    def init(rng, task):
        params = {"backbone": init_params(backbone, rng, task.support_x)}
        if full_context:
            support, query = embed_task(backbone, params["backbone"], task)
            params["fce"] = init_params(fce, rng, support, query)
        return params

    def log_probs(params, task, rng):
        support, query = embed_task(backbone, params["backbone"], task)
        if full_context:
            support, query = fce.apply({"params": params["fce"]}, support, query)
        attention = jax.nn.softmax(scale * _normalise(query) @ _normalise(support).T, -1)
        return jnp.log(attention @ one_hot_support(task) + 1e-12)

    def loss(params, task, rng):
        logp = log_probs(params, task, rng)
        nll = -jnp.mean(jnp.take_along_axis(logp, task.query_y[:, None], -1))
        return nll, {"accuracy": accuracy(logp, task.query_y)}

    return Learner(init=init, task_loss=loss, task_predict=log_probs, task_map=task_map)
