"""N-way K-shot Q-query episodes, sampled reproducibly from a :class:`CharacterSet`.

Episode ``i`` of a sampler depends only on ``(seed, i)``, so a resumed training run sees
exactly the episodes an uninterrupted one would. Supports are class-major: support image
``n * K + k`` is shot ``k`` of way ``n``; queries likewise with Q per way.
"""
from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np

from fsl_jax.data.omniglot import CharacterSet
from fsl_jax.errors import DataError


class Episode(NamedTuple):
    """A batch of few-shot tasks (a pytree of arrays).

    support_x: [T, N*K, H, W, C]; support_y: [T, N*K] int32 in [0, N)
    query_x: [T, N*Q, H, W, C];   query_y: [T, N*Q] int32 in [0, N)
    classes: [T, N] int32 ids of the ways in the sampler's class list (for transfer pre-training).
    Learners see one task at a time (the leading T axis removed) inside ``vmap``/``lax.map``.
    """

    support_x: np.ndarray
    support_y: np.ndarray
    query_x: np.ndarray
    query_y: np.ndarray
    classes: np.ndarray

    @property
    def ways(self) -> int:
        return self.classes.shape[-1]


def with_rotations(chars: CharacterSet) -> CharacterSet:
    """Rotations by 90, 180 and 270 degrees as new classes (Santoro et al. 2016): 4x the classes."""
    images = np.concatenate([np.rot90(chars.images, k, axes=(-2, -1)) for k in range(4)])
    suffix = lambda k: "" if k == 0 else f"@rot{90 * k}"
    return CharacterSet(np.ascontiguousarray(images), chars.alphabets * 4,
                        tuple(c + suffix(k) for k in range(4) for c in chars.characters))


class EpisodeSampler:
    """Seeded sampler of ``tasks`` episodes at a time, N ways, K shots and Q queries per way."""

    def __init__(self, chars: CharacterSet, ways: int, shots: int, queries: int, tasks: int = 1,
                 seed: int = 0, drawers: tuple[int, ...] | None = None):
        self.images = chars.images[..., None]  # channel axis
        if drawers is not None:
            self.images = self.images[:, chars.drawer_indices(drawers)]
        num_classes, per_class = self.images.shape[:2]
        for name, value in (("ways", ways), ("shots", shots), ("queries", queries), ("tasks", tasks)):
            if int(value) < 1:
                raise DataError(f"{name} must be at least 1, got {value}")
        if ways > num_classes:
            raise DataError(f"ways={ways} is larger than the {num_classes} classes available")
        if shots + queries > per_class:
            raise DataError(f"shots+queries={shots + queries} is larger than the {per_class} images per class")
        self.ways, self.shots, self.queries, self.tasks, self.seed = ways, shots, queries, tasks, seed

    def sample(self, index: int) -> Episode:
        """Batch number ``index`` (deterministic in ``(seed, index)``)."""
        rng = np.random.default_rng([self.seed, index])
        num_classes, per_class = self.images.shape[:2]
        n, k, q, t = self.ways, self.shots, self.queries, self.tasks
        classes = rng.random((t, num_classes)).argsort(axis=1)[:, :n]
        drawers = rng.random((t, n, per_class)).argsort(axis=2)[:, :, : k + q]
        picked = self.images[classes[:, :, None], drawers]  # [T, N, K+Q, H, W, C]
        labels = np.broadcast_to(np.arange(n, dtype=np.int32)[None, :, None], (t, n, k + q))
        shape = picked.shape[3:]
        return Episode(
            support_x=picked[:, :, :k].reshape(t, n * k, *shape),
            support_y=labels[:, :, :k].reshape(t, n * k),
            query_x=picked[:, :, k:].reshape(t, n * q, *shape),
            query_y=labels[:, :, k:].reshape(t, n * q),
            classes=classes.astype(np.int32),
        )

    def __iter__(self):
        index = 0
        while True:
            yield self.sample(index)
            index += 1

    def throughput(self, batches: int = 50) -> float:
        """Episodes per second this sampler produces on this machine."""
        start = time.perf_counter()
        for i in range(batches):
            self.sample(i)
        return batches * self.tasks / (time.perf_counter() - start)
