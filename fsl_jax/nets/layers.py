"""Layers shared by the backbones and decoders."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn


class BatchNorm(nn.Module):
    """Batch normalisation with the statistics of the current batch (Ioffe and Szegedy, 2015).

    Few-shot learners normalise each episode with its own statistics, the transductive
    convention of MAML (Finn et al., 2017) and most episodic methods, so the only state is
    the ``scale`` and ``bias`` parameters: the parameter pytree is the whole model.

    Deployment needs fixed statistics: applying with ``mutable=["norm_stats"]`` records the
    statistics of a reference batch (the support set, say), and any later ``apply`` that is
    given that ``norm_stats`` collection uses them instead of the batch's own.
    """

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        if self.has_variable("norm_stats", "mean") and not self.is_mutable_collection("norm_stats"):
            mean = self.get_variable("norm_stats", "mean")
            var = self.get_variable("norm_stats", "var")
        else:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x, axes)
            var = jnp.maximum(jnp.mean(jnp.square(x), axes) - jnp.square(mean), 0.0)
            if self.is_mutable_collection("norm_stats"):
                self.put_variable("norm_stats", "mean", mean)
                self.put_variable("norm_stats", "var", var)
        inv = jax.lax.rsqrt(var + self.epsilon) * scale
        return x * inv + (bias - mean * inv)


def max_pool(x, window: int = 2):
    """Non-overlapping max pooling (floor of odd sizes, as PyTorch's MaxPool2d)."""
    return nn.max_pool(x, (window, window), strides=(window, window))
