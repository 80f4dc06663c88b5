"""U-Net parts (Ronneberger et al., 2015) for the segmenters: an encoder that keeps its skips, a decoder
that upsamples through them, and the two joined.

Normalisation is per image (layer normalisation over height, width and channels, with a
learned per-channel scale and bias, as in the Siamese-U-Net of Michaelis et al. 2018): a
32x32 exemplar, a 96x96 scene and a support set of any size are each normalised alone,
so nothing depends on what else is in the batch. Every layer is a standard operation
(convolution, transposed convolution, bilinear resize, max pooling, elementwise), so the
models lower to plain TensorFlow and Core ML ops.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fsl_jax.errors import ConfigError, check_count
from fsl_jax.nets.layers import conv, max_pool

UPSAMPLING = ("bilinear", "transpose")


def image_norm(name: str | None = None) -> nn.LayerNorm:
    """Normalise each image over (H, W, C); learned scale and bias per channel."""
    return nn.LayerNorm(reduction_axes=(-3, -2, -1), feature_axes=-1, name=name)


class ConvBlock(nn.Module):
    """``convs`` x (conv3x3 -> per-image norm -> ReLU)."""

    width: int
    convs: int = 2
    im2col: bool = False

    @nn.compact
    def __call__(self, x):
        for i in range(self.convs):
            x = conv(self.width, 3, self.im2col, f"conv{i}")(x)
            x = nn.relu(image_norm(f"norm{i}")(x))
        return x


class UNetEncoder(nn.Module):
    """Contracting path: a :class:`ConvBlock` per width, 2x2 max pooling between them.

    Returns ``(bottleneck, skips)``: the last block's output (stride 2^(len(widths)-1)) and
    the outputs of the earlier blocks, shallowest first.
    """

    widths: Sequence[int] = (16, 32, 64, 128)
    convs: int = 2
    im2col: bool = False

    @nn.compact
    def __call__(self, x):
        skips = []
        for i, width in enumerate(self.widths):
            if i:
                skips.append(x)
                x = max_pool(x)
            x = ConvBlock(width, self.convs, self.im2col, name=f"block{i}")(x)
        return x, skips


class UNetDecoder(nn.Module):
    """Expanding path: for each skip, deepest first, upsample to its size, concatenate, :class:`ConvBlock`
    of the skip's width; a final 1x1 convolution gives ``outputs`` channels of logits.

    upsample: "bilinear" (resize) or "transpose" (a learned 2x2 stride-2 transposed
    convolution, zero-padded by a pixel where the skip has an odd size).
    """

    upsample: str = "bilinear"
    outputs: int = 1
    convs: int = 2
    im2col: bool = False

    @nn.compact
    def __call__(self, x, skips):
        if self.upsample not in UPSAMPLING:
            raise ConfigError(f"upsample must be one of {UPSAMPLING}, got {self.upsample!r}")
        for i, skip in enumerate(reversed(skips)):
            height, width = skip.shape[-3:-1]
            if self.upsample == "bilinear":
                x = jax.image.resize(x, (*x.shape[:-3], height, width, x.shape[-1]), "bilinear")
            else:
                x = nn.ConvTranspose(x.shape[-1], (2, 2), strides=(2, 2), name=f"up{i}")(x)
                pad = [(0, 0)] * (x.ndim - 3) + [(0, height - x.shape[-3]), (0, width - x.shape[-2]), (0, 0)]
                x = jnp.pad(x, pad)
            x = ConvBlock(skip.shape[-1], self.convs, self.im2col, name=f"block{i}")(jnp.concatenate([x, skip], -1))
        return conv(self.outputs, 1, self.im2col, "head")(x)


class UNet(nn.Module):
    """Encoder and decoder with skip connections: images [B, H, W, C] -> logits [B, H, W, outputs]."""

    widths: Sequence[int] = (16, 32, 64)
    upsample: str = "bilinear"
    outputs: int = 1
    convs: int = 2
    im2col: bool = False

    @nn.compact
    def __call__(self, x):
        for name, value in (("outputs", self.outputs), ("convs", self.convs), *(("widths", w) for w in self.widths)):
            check_count(f"unet {name}", value)
        x, skips = UNetEncoder(self.widths, self.convs, self.im2col, name="encoder")(x)
        return UNetDecoder(self.upsample, self.outputs, self.convs, self.im2col, name="decoder")(x, skips)
