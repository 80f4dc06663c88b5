"""Few-shot segmentation data in the FSS-1000 folder layout (Li et al., CVPR 2020): bring your own classes.

Layout: ``ROOT/<class>/<n>.jpg`` (or ``.jpeg``, any case) with its binary mask
``ROOT/<class>/<n>.png`` (foreground 255 or 1, background 0; a palette PNG's values are its
palette indices, not its colours, as in PASCAL VOC). Hidden entries (names starting with ``.``)
and the operating systems' own (``__MACOSX``, ``desktop.ini``, ``Thumbs.db``) are skipped in the
root and in class folders alike. Every other file is checked as it is read: a missing or
unreadable file, a mask without its image, any other file in a class folder, an empty class
folder, an image with transparent pixels, a mask whose size differs from its image, a mask that
is not 8-bit, is in colour or holds values other than 0 and 255 (or 0 and 1), or one with no
foreground pixel, before or after resizing, is an error naming the file. Photos are turned
upright by their EXIF orientation, as a viewer (and an annotation tool) shows them. Images and
masks are then brought to ``image_size`` square (bilinear and nearest, so masks stay binary) as
``resize`` says: ``"stretch"`` scales each side on its own (FSS-1000's own images are square, so
nothing is distorted); ``"pad"`` keeps the aspect ratio, scaling the longer side to
``image_size`` and centring the picture on black, the padding marked background. Either is an
explicit setting, never a silent fix of mismatched files.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps

from fsl_jax.data.segmentation import SegEpisode
from fsl_jax.errors import ConfigError, DataError


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


IMAGE_SUFFIXES = (".jpg", ".jpeg")
RESIZE_MODES = ("stretch", "pad")
OS_ENTRIES = ("__macosx", "desktop.ini", "thumbs.db")  # lower case: Windows names them in any case


def skipped(path: Path) -> bool:
    """Whether a folder entry is hidden (``.DS_Store``, macOS' ``._*`` copies, ``.ipynb_checkpoints``)
    or the operating system's (a Mac zip's ``__MACOSX``, Windows' ``desktop.ini`` and ``Thumbs.db``)."""
    return path.name.startswith(".") or path.name.lower() in OS_ENTRIES


def open_image(path: Path) -> Image.Image:
    """An image file read whole and turned upright by its EXIF orientation; unreadable files name themselves."""
    try:
        image = Image.open(path)
        image.load()
    except Exception as err:  # PIL raises several types for broken files
        raise DataError(f"cannot read {path}: {err}") from err
    return ImageOps.exif_transpose(image)


def upright_size(path: Path) -> tuple[int, int]:
    """(width, height) of the image :func:`open_image` returns, from the file's header alone:
    orientations 5 to 8 turn the stored picture a quarter, swapping its sides."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception as err:  # PIL raises several types for broken files
        raise DataError(f"cannot read {path}: {err}") from err
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _square(picture: Image.Image, size: int, resample, resize: str) -> np.ndarray:
    """``picture`` at ``size`` x ``size``, stretched or padded (see the module docstring)."""
    if resize == "stretch":
        return np.asarray(picture.resize((size, size), resample))
    scale = size / max(picture.size)
    width, height = (max(1, round(side * scale)) for side in picture.size)
    canvas = Image.new(picture.mode, (size, size))
    canvas.paste(picture.resize((width, height), resample), ((size - width) // 2, (size - height) // 2))
    return np.asarray(canvas)


def check_opaque(image: Image.Image, name: str) -> None:
    """A DataError naming ``name`` if the image has transparent pixels: what they hide (black, often)
    is not what a viewer shows behind them."""
    if "A" in image.getbands() and image.getchannel("A").getextrema()[0] < 255:
        raise DataError(f"{name} has transparent pixels (mode {image.mode}); save it without transparency")


def check_grey(pixels: np.ndarray, mask_path: Path) -> None:
    """A DataError naming the file and its colours if an RGB mask [H, W, 3] is not grey: its
    objects told apart by colour, it is no binary mask, and its grey levels are nothing the user wrote."""
    if (pixels == pixels[..., :1]).all():
        return
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    listed = ", ".join(str(tuple(c)) for c in colours[:5].tolist()) + (", ..." if len(colours) > 5 else "")
    raise DataError(f"mask {mask_path} is a colour image: it holds the colours [{listed}]; a mask is binary, "
                    "0 for background and 255 or 1 for the object, in a grayscale (or palette) PNG")


def read_pair(image_path: Path, mask_path: Path, image_size: int,
              resize: str = "stretch") -> tuple[np.ndarray, np.ndarray]:
    """One image and its mask, checked, at ``image_size`` x ``image_size``: (uint8 [S, S, 3], bool [S, S])."""
    if resize not in RESIZE_MODES:
        raise ConfigError(f"resize (data.resize) must be one of {list(RESIZE_MODES)}, got {resize!r}")
    image, mask = open_image(image_path), open_image(mask_path)
    check_opaque(image, f"image {image_path}")
    if mask.mode.startswith(("I", "F")):
        raise DataError(f"mask {mask_path} is a {mask.mode} image; a mask is 8-bit: 0 for background, 255 or 1 "
                        "for the object")
    palette = mask.mode in ("P", "PA")
    if mask.mode in ("RGB", "RGBA"):
        check_grey(np.asarray(mask.convert("RGB")), mask_path)
    # A palette mask stores its labels as palette indices (PASCAL VOC's convention); the colours are for viewing.
    image, mask = image.convert("RGB"), Image.fromarray(np.asarray(mask.getchannel(0))) if palette else mask.convert("L")
    if image.size != mask.size:
        raise DataError(f"mask {mask_path} is {mask.size[0]}x{mask.size[1]} but its image {image_path} is "
                        f"{image.size[0]}x{image.size[1]}: a mask must have exactly its image's size")
    values = np.unique(np.asarray(mask))
    if not (set(values.tolist()) <= {0, 255} or set(values.tolist()) <= {0, 1}):
        bad = [v for v in values.tolist() if v not in (0, 1, 255)][:3] or values.tolist()
        raise DataError(f"mask {mask_path} is not binary: it holds {'palette indices' if palette else 'values'} "
                        f"{bad} (a mask is 0 for background and 255 or 1 for the object)")
    if values.max() == 0:
        raise DataError(f"mask {mask_path} is empty (no foreground pixel): every image must show its class")
    image = _square(image, image_size, Image.BILINEAR, resize).astype(np.uint8)
    mask = _square(mask, image_size, Image.NEAREST, resize) > 0
    if not mask.any():
        raise DataError(f"mask {mask_path} has no foreground pixel left at {image_size}x{image_size}: its object "
                        "is too small or thin for that image_size (raise it, or leave the image out)")
    return image, mask


def class_pairs(folder: Path) -> list[tuple[Path, Path]]:
    """The (image, mask) files of one class folder, by image number; any other file is an error."""
    entries = sorted(p for p in folder.iterdir() if not skipped(p))
    images = {p.stem: p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES}
    masks = {p.stem: p for p in entries if p.suffix.lower() == ".png"}
    for path in entries:
        if path.is_dir():
            raise DataError(f"{folder} holds a folder, {path.name}: a class folder holds <n>.jpg images and their "
                            "<n>.png masks only")
        if path.stem in images and path.stem in masks and path not in (images[path.stem], masks[path.stem]):
            raise DataError(f"{path} is a second file for image {path.stem} of {folder}")
        if path.stem not in images:
            kind = "mask" if path.stem in masks else "file"
            raise DataError(f"{kind} {path} has no image {folder / path.stem}.jpg: a class folder holds "
                            "<n>.jpg images and their <n>.png masks only")
        if path.stem not in masks:
            raise DataError(f"{path} has no mask: {folder / path.stem}.png is missing")
    if not images:
        raise DataError(f"class folder {folder} holds no <n>.jpg image")
    return [(images[n], masks[n]) for n in sorted(images, key=lambda n: (len(n), n))]


def load_fss(root: str | Path, image_size: int = 224, resize: str = "stretch") -> SegmentationSet:
    """Every class folder of ``root`` (sorted by name; hidden and system folders skipped), every ``<n>.jpg``
    with its ``<n>.png``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"FSS data directory {root} " + ("is a file, not a directory" if root.exists() else "does not exist"))
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not skipped(p))
    if not folders:
        raise DataError(f"no class folder in {root}: the FSS-1000 layout is ROOT/<class>/<n>.jpg and <n>.png")
    images, masks, labels = [], [], []
    for label, folder in enumerate(folders):
        for image_path, mask_path in class_pairs(folder):
            image, mask = read_pair(image_path, mask_path, image_size, resize)
            images.append(image)
            masks.append(mask)
            labels.append(label)
    return SegmentationSet(np.stack(images), np.stack(masks), np.array(labels), tuple(p.name for p in folders))


def split_classes(data: SegmentationSet, test_classes=None) -> tuple[SegmentationSet, SegmentationSet]:
    """(train, test) sets with disjoint classes: ``test_classes`` by name, or every fourth class in name order."""
    if isinstance(test_classes, str):
        raise DataError(f"test_classes must be a list of class names, got the string {test_classes!r}")
    names = list(data.classes[3::4]) if test_classes is None else list(test_classes)
    train, test = data.select([c for c in data.classes if c not in set(names)]), data.select(names)
    for side, part in (("training", train), ("test", test)):
        if not part.classes:
            raise DataError(f"the class split leaves no {side} class among the {len(data.classes)} classes "
                            f"{list(data.classes[:10])}: name the test classes (data.test_classes; by default every "
                            "fourth class is held out, so at least four are needed)")
    return train, test


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
