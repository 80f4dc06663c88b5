"""Feature extractors: images [B, H, W, C] -> feature maps [B, h, w, c]."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from fsl_jax.nets.decoders import UNet
from fsl_jax.nets.layers import BatchNorm, Conv, NormReluPool, conv, max_pool


class Conv4(nn.Module):
    """Four blocks of conv3x3 -> BatchNorm -> ReLU -> maxpool2 (Vinyals et al., 2016; Snell et al., 2017).

    The convolutions have no bias: BatchNorm subtracts the mean of its input, which cancels a
    bias exactly, so it would be a parameter without effect that still costs a pass over the
    largest activations (and its gradient) in every step. Without one, the first block's
    BatchNorm takes its batch statistics from the convolution's columns (:class:`Conv`'s
    ``moments``) instead of from the 28x28x64 activations.

    ``pooled_blocks`` keeps pooling in the first blocks only (the Relation Network's encoder
    pools in two), so the feature map stays large enough for a learned comparison.
    ``im2col=False`` uses XLA's convolutions on CPU too (see :func:`fsl_jax.nets.layers.conv`).
    """

    width: int = 64
    blocks: int = 4
    pooled_blocks: int = 4
    im2col: bool = True

    @nn.compact
    def __call__(self, x):
        for i in range(self.blocks):
            if self.im2col:
                x, moments = Conv(self.width, (3, 3), use_bias=False, moments=True, name=f"conv{i}")(x)
            else:
                x, moments = conv(self.width, 3, False, f"conv{i}", use_bias=False)(x), None
            if i < self.pooled_blocks:
                x = NormReluPool(name=f"norm{i}")(x, moments)
            else:
                x = nn.relu(BatchNorm(name=f"norm{i}")(x, moments))
        return x


class ResidualBlock(nn.Module):
    """Three conv3x3 with BatchNorm and leaky ReLU, a 1x1 projection shortcut, maxpool2."""

    width: int
    im2col: bool = True

    @nn.compact
    def __call__(self, x):
        shortcut = BatchNorm(name="shortcut_norm")(conv(self.width, 1, self.im2col, "shortcut", use_bias=False)(x))
        for i in range(3):
            x = conv(self.width, 3, self.im2col, f"conv{i}", use_bias=False)(x)
            x = BatchNorm(name=f"norm{i}")(x)
            if i < 2:
                x = nn.leaky_relu(x, 0.1)
        return max_pool(nn.leaky_relu(x + shortcut, 0.1))


class ResNet12(nn.Module):
    """ResNet-12 (Oreshkin et al., 2018; Lee et al., 2019): four residual blocks of three convolutions.
    ``im2col`` as in :class:`Conv4`."""

    widths: Sequence[int] = (64, 160, 320, 640)
    im2col: bool = True

    @nn.compact
    def __call__(self, x):
        for i, width in enumerate(self.widths):
            x = ResidualBlock(width, self.im2col, name=f"block{i}")(x)
        return x


# "unet" (fsl_jax.nets.decoders.UNet with ``outputs`` feature channels) keeps the input's resolution:
# a backbone for per-pixel features (the prototype segmenter), not for classifiers.
BACKBONES = {"conv4": Conv4, "resnet12": ResNet12, "unet": UNet}
