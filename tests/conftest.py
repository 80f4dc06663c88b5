"""Shared fixtures. Tests read the bundled Omniglot background sets (../shared/data) and never the network."""
from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from fsl_jax.data.omniglot import CharacterSet, load_omniglot

# The tests check the maths in true float32, and GPU reductions in a fixed order (a resumed run
# repeats the whole one bit for bit). On GPUs XLA's defaults are TF32 products and convolutions
# (about 1e-3 relative error, looser than the tests' tolerances) and reductions whose order varies;
# on CPUs neither setting changes anything.
jax.config.update("jax_default_matmul_precision", "highest")
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_gpu_deterministic_ops=true".strip()


@pytest.fixture(scope="session")
def omniglot28() -> CharacterSet:
    """All 242 characters of the two small background sets at 28x28."""
    return load_omniglot(image_size=28)


@pytest.fixture(scope="session")
def omniglot105() -> CharacterSet:
    """The same characters at their native 105x105."""
    return load_omniglot(image_size=105)


@pytest.fixture
def tiny_chars() -> CharacterSet:
    """12 synthetic classes of 20 drawers, 28x28: each class a bright square at its own place."""
    rng = np.random.default_rng(0)
    images = rng.random((12, 20, 28, 28)).astype(np.float32) * 0.1
    for c in range(12):
        r, col = divmod(c, 4)
        images[c, :, 2 + 8 * r: 8 + 8 * r, 2 + 6 * col: 7 + 6 * col] += 0.9
    return CharacterSet(images, tuple(f"alpha{c % 3}" for c in range(12)), tuple(f"character{c:02d}" for c in range(12)))
