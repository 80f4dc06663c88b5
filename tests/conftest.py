"""Shared fixtures. Tests read the bundled Omniglot background sets (../shared/data) and never the network."""
from __future__ import annotations

import numpy as np
import pytest

from fsl_jax.data.omniglot import CharacterSet, load_omniglot


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
