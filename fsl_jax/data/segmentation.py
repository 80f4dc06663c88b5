"""Few-shot segmentation episodes: K support images with binary masks, Q query images to segment.

Every segmentation source (cluttered Omniglot, Omniglot K-shot scenes, FSS-1000 folders,
fixed sets stored as ``.npy``) produces :class:`SegEpisode` batches, and every segmenter
consumes them, so any segmenter can be trained and evaluated on any source. Support and
query images may differ in size (the clutter protocol's 32x32 exemplar and 96x96 scene);
within each, a mask has exactly its image's height and width.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from fsl_jax.errors import DataError


class SegEpisode(NamedTuple):
    """A batch of T one-class segmentation tasks (a pytree of arrays).

    support_x: [T, K, h, w, C] float32 in [0, 1];  support_mask: [T, K, h, w] float32 in {0, 1}
    query_x:   [T, Q, H, W, C];                    query_mask:   [T, Q, H, W]
    classes: [T] int32 id of each task's class in its source's class list (for per-class mIoU).
    distractors: [T] int32 clutter level of each task's scenes (0 where there is no clutter).
    Segmenters see one task at a time (the leading T axis removed).
    """

    support_x: np.ndarray
    support_mask: np.ndarray
    query_x: np.ndarray
    query_mask: np.ndarray
    classes: np.ndarray
    distractors: np.ndarray

    @property
    def shots(self) -> int:
        return self.support_x.shape[-4]

    @property
    def tasks(self) -> int:
        return self.support_x.shape[0]


def check_mask(mask: np.ndarray, image_shape: tuple[int, ...], name: str) -> None:
    """A mask must have its image's height and width and hold only 0 and 1 (never resized or rounded here)."""
    if tuple(mask.shape) != tuple(image_shape):
        raise DataError(f"{name} is {tuple(mask.shape)} but its image is {tuple(image_shape)}: a mask must have "
                        "exactly its image's height and width")
    values = np.unique(mask)
    if not np.isin(values, (0, 1)).all():
        bad = values[~np.isin(values, (0, 1))][:3].tolist()
        raise DataError(f"{name} is not binary: it holds values {bad} besides 0 and 1")


def check_episode(episode: SegEpisode, name: str = "episode") -> SegEpisode:
    """Validate a batch from outside the library: shapes agree, images in [0, 1], masks binary, no
    empty support mask, class ids from 0.

    An empty support mask would leave a segmenter nothing to learn the class from (and a
    prototype a division by zero), so it is an error rather than a NaN later.
    """
    if episode.support_x.ndim != 5 or episode.query_x.ndim != 5:
        raise DataError(f"{name}: support_x and query_x must be [tasks, images, H, W, C], got "
                        f"{episode.support_x.shape} and {episode.query_x.shape}")
    if episode.support_x.shape[0] != episode.query_x.shape[0]:
        raise DataError(f"{name}: support_x holds {episode.support_x.shape[0]} tasks but query_x "
                        f"{episode.query_x.shape[0]}")
    if episode.support_x.shape[-1] != episode.query_x.shape[-1]:
        raise DataError(f"{name}: support images have {episode.support_x.shape[-1]} channels, queries "
                        f"{episode.query_x.shape[-1]}")
    for field in ("support_x", "query_x"):
        images = getattr(episode, field)
        if images.size and not (np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1):
            raise DataError(f"{name}.{field} holds values from {images.min()} to {images.max()}: images are "
                            "float in [0, 1] (uint8 0-255 in a saved set)")
    check_mask(episode.support_mask, episode.support_x.shape[:-1], f"{name}.support_mask")
    check_mask(episode.query_mask, episode.query_x.shape[:-1], f"{name}.query_mask")
    empty = np.argwhere(episode.support_mask.reshape(*episode.support_mask.shape[:2], -1).max(-1) == 0)
    if len(empty):
        task, shot = empty[0]
        raise DataError(f"{name}: support mask {shot} of task {task} is empty (no foreground pixel): "
                        "every support image must show the class")
    for field in ("classes", "distractors"):
        values = getattr(episode, field)
        if values.shape != (episode.tasks,):
            raise DataError(f"{name}.{field} must have shape ({episode.tasks},), got {values.shape}")
        if values.size and values.min() < 0:
            raise DataError(f"{name}.{field} must be non-negative, got {values.min()}")
    return episode


def collect(sampler, episodes: int) -> SegEpisode:
    """The first ``episodes`` tasks of a sampler's batches 0, 1, ... as one :class:`SegEpisode`."""
    batches = [sampler.sample(i) for i in range(-(-episodes // sampler.tasks))]
    return SegEpisode(*(np.concatenate(field)[:episodes] for field in zip(*batches)))


def save_episodes(episodes: SegEpisode, directory: str | Path) -> Path:
    """Write a fixed set (validation or test) as one ``.npy`` file per field; masks and images as uint8."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for field, array in episodes._asdict().items():
        if field in ("support_x", "query_x"):
            array = np.round(array * 255)
        np.save(directory / f"{field}.npy", array.astype(np.uint8 if field not in ("classes", "distractors") else np.int32))
    return directory


def load_episodes(directory: str | Path) -> SegEpisode:
    """A fixed set written by :func:`save_episodes` (or by hand in that layout), validated."""
    directory = Path(directory)
    arrays = {}
    for field in SegEpisode._fields:
        path = directory / f"{field}.npy"
        if not path.is_file():
            raise DataError(f"{path} is missing: a fixed episode set has one .npy file per field {SegEpisode._fields}")
        try:
            arrays[field] = np.load(path)
        except (ValueError, OSError, EOFError) as err:
            raise DataError(f"cannot read {path} as a numpy array: {err}") from err
    for field in ("support_x", "query_x"):
        arrays[field] = arrays[field].astype(np.float32) / (255.0 if arrays[field].dtype == np.uint8 else 1.0)
    for field in ("support_mask", "query_mask"):
        arrays[field] = arrays[field].astype(np.float32)
    return check_episode(SegEpisode(**arrays), str(directory))


class FixedEpisodes:
    """Serve a fixed set in batches of ``tasks``: batch ``index`` is tasks ``index*tasks ...`` (wrapping)."""

    def __init__(self, episodes: SegEpisode, tasks: int):
        if tasks < 1:
            raise DataError(f"tasks must be at least 1, got {tasks}")
        self.episodes, self.tasks = episodes, tasks

    def sample(self, index: int) -> SegEpisode:
        rows = (np.arange(self.tasks) + index * self.tasks) % self.episodes.tasks
        return SegEpisode(*(np.asarray(a[rows]) for a in self.episodes))
