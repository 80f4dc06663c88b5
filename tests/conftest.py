"""Shared fixtures. Tests read the bundled Omniglot background sets (../shared/data) and never the network."""
from __future__ import annotations

import os
import shutil
import tempfile

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


# The tests build the same programs again and again (the tiny run trained in many tests, each
# host of the two-host tests): JAX's persistent compilation cache compiles each once per run, not
# once per test. It keeps programs that took a second or more to compile, in a directory of the
# first pytest process's own, removed at its end; its xdist workers and the processes the tests
# start inherit it. A cache the caller chose is used as it is, and kept.
if "JAX_COMPILATION_CACHE_DIR" in os.environ:
    _OWN_CACHE = None
else:
    _OWN_CACHE = tempfile.mkdtemp(prefix="fsl_jax-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
    jax.config.update("jax_compilation_cache_dir", _OWN_CACHE)


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


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
