"""Backbones (feature extractors) and decoders, all Flax Linen modules."""
from fsl_jax.nets.backbones import BACKBONES, Conv4, ResNet12
from fsl_jax.nets.decoders import UNet
from fsl_jax.nets.layers import BatchNorm, NormReluPool

__all__ = ["BACKBONES", "BatchNorm", "Conv4", "NormReluPool", "ResNet12", "UNet"]
