"""Few-shot segmentation data in the FSS-1000 folder layout (Li et al., CVPR 2020): bring your own classes.

Layout: ``ROOT/<class>/<n>.jpg`` with its binary mask ``ROOT/<class>/<n>.png`` (foreground
255 or 1, background 0). Every image is checked as it is read: a missing or unreadable
file, a mask whose size differs from its image, a mask with values other than 0 and
255 (or 0 and 1), or a mask with no foreground pixel is an error naming the file. Images and
masks are then resized to ``image_size`` (bilinear and nearest, so masks stay binary): an
explicit setting, never a silent fix of mismatched files.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

from fsl_jax.data.segmentation import SegEpisode
from fsl_jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class SegmentationSet:
    """Images of several classes with their masks: image ``i`` shows class ``classes[labels[i]]``."""

    images: np.ndarray  # [N, S, S, 3] uint8
    masks: np.ndarray  # [N, S, S] bool
    labels: np.ndarray  # [N] int
    classes: tuple[str, ...]

    def select(self, names) -> "SegmentationSet":
        """The images of the named classes (unknown names raise)."""
        unknown = sorted(set(names) - set(self.classes))
        if unknown:
            raise DataError(f"unknown class(es) {unknown[:5]}; known: {list(self.classes[:10])}...")
        keep = [c for c, name in enumerate(self.classes) if name in set(names)]
        rows = np.isin(self.labels, keep)
        relabel = np.full(len(self.classes), -1)
        relabel[keep] = np.arange(len(keep))
        return SegmentationSet(self.images[rows], self.masks[rows], relabel[self.labels[rows]],
                               tuple(self.classes[c] for c in keep))


def _open(path: Path, mode: str) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except Exception as err:  # PIL raises several types for broken files
        raise DataError(f"cannot read {path}: {err}") from err
    return image.convert(mode)


def read_pair(image_path: Path, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One image and its mask, checked, at ``image_size`` x ``image_size``: (uint8 [S, S, 3], bool [S, S])."""
    mask_path = image_path.with_suffix(".png")
    if not mask_path.is_file():
        raise DataError(f"{image_path} has no mask: {mask_path} is missing")
    image, mask = _open(image_path, "RGB"), _open(mask_path, "L")
    if image.size != mask.size:
        raise DataError(f"mask {mask_path} is {mask.size[0]}x{mask.size[1]} but its image {image_path} is "
                        f"{image.size[0]}x{image.size[1]}: a mask must have exactly its image's size")
    values = np.unique(np.asarray(mask))
    if not (set(values.tolist()) <= {0, 255} or set(values.tolist()) <= {0, 1}):
        bad = [v for v in values.tolist() if v not in (0, 1, 255)][:3] or values.tolist()
        raise DataError(f"mask {mask_path} is not binary: it holds values {bad} (a mask is 0 for background and "
                        "255 or 1 for the object)")
    if values.max() == 0:
        raise DataError(f"mask {mask_path} is empty (no foreground pixel): every image must show its class")
    image = image.resize((image_size, image_size), Image.BILINEAR)
    mask = mask.resize((image_size, image_size), Image.NEAREST)
    return np.asarray(image, np.uint8), np.asarray(mask) > 0


def load_fss(root: str | Path, image_size: int = 224) -> SegmentationSet:
    """Every class folder of ``root`` (sorted by name), every ``<n>.jpg`` with its ``<n>.png``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"FSS data directory {root} does not exist")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    images, masks, labels, classes = [], [], [], []
    for folder in folders:
        files = sorted(folder.glob("*.jpg"), key=lambda p: (len(p.stem), p.stem))
        if not files:
            continue
        for path in files:
            image, mask = read_pair(path, image_size)
            images.append(image)
            masks.append(mask)
            labels.append(len(classes))
        classes.append(folder.name)
    if not classes:
        raise DataError(f"no class folder with <n>.jpg and <n>.png files in {root}")
    return SegmentationSet(np.stack(images), np.stack(masks), np.array(labels), tuple(classes))


def split_classes(data: SegmentationSet, test_classes=None) -> tuple[SegmentationSet, SegmentationSet]:
    """(train, test) sets with disjoint classes: ``test_classes`` by name, or every fourth class in name order."""
    names = list(test_classes) if test_classes else list(data.classes[3::4])
    return data.select([c for c in data.classes if c not in set(names)]), data.select(names)


class SegmentationEpisodes:
    """Seeded K-shot episodes from a :class:`SegmentationSet`: batch ``index`` depends only on ``(seed, index)``."""

    def __init__(self, data: SegmentationSet, shots: int = 1, queries: int = 1, tasks: int = 4, seed: int = 0):
        for name, value in (("shots", shots), ("queries", queries), ("tasks", tasks)):
            if value < 1:
                raise DataError(f"{name} must be at least 1, got {value}")
        counts = np.bincount(data.labels, minlength=len(data.classes))
        if counts.min() < shots + queries:
            name = data.classes[int(counts.argmin())]
            raise DataError(f"class {name!r} has {counts.min()} images, fewer than shots+queries={shots + queries}")
        self.data, self.shots, self.queries, self.tasks, self.seed = data, shots, queries, tasks, seed
        self.members = [np.flatnonzero(data.labels == c) for c in range(len(data.classes))]

    def sample(self, index: int) -> SegEpisode:
        rng = np.random.default_rng([self.seed, index])
        k, q = self.shots, self.queries
        classes = rng.integers(len(self.members), size=self.tasks)
        rows = np.stack([rng.choice(self.members[c], k + q, replace=False) for c in classes])
        images = self.data.images[rows].astype(np.float32) / 255.0
        masks = self.data.masks[rows].astype(np.float32)
        return SegEpisode(support_x=images[:, :k], support_mask=masks[:, :k], query_x=images[:, k:],
                          query_mask=masks[:, k:], classes=classes.astype(np.int32),
                          distractors=np.zeros(self.tasks, np.int32))
