"""Omniglot (Lake, Salakhutdinov and Tenenbaum, Science 2015) from its official zip files.

Every character has exactly 20 drawers, so a split is one dense array
``images[class, drawer, H, W]`` of float32 in [0, 1] with strokes = 1. Decoding the
PNGs happens once; the decoded 105x105 images are cached as ``.npz`` next to the
user's cache (``FSL_JAX_CACHE`` or ``~/.cache/fsl_jax``), keyed by the zips' names and sizes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import re
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from fsl_jax.errors import DataError

DRAWERS = 20
NATIVE_SIZE = 105
# Alphabets held out of training by default: alphabet-disjoint evaluation on the two
# small background sets (the only Omniglot bundled here). Both have >= 20 characters,
# so Lake's 20-way within-alphabet runs can be built from each.
DEFAULT_TEST_ALPHABETS = ("Balinese", "Korean")
# The zips read by default: the two small background sets, the bundled data and the protocol of
# this project's tables. Lake's evaluation alphabets (images_evaluation.zip) are read only when
# named: his original one-shot runs come from them, so they must not slip into training.
SMALL_BACKGROUND = ("images_background_small1.zip", "images_background_small2.zip")
_PNG = re.compile(r"^(?:[^/]+/)?(?P<alphabet>[^/]+)/(?P<character>character\d+)/(?P<file>\d+_(?P<drawer>\d+)\.png)$")


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """Resolve the data root: ``data_dir``, then ``$FSL_JAX_DATA``, then ``../shared/data``."""
    for candidate, origin in ((data_dir, "data.dir, --data-dir"), (os.environ.get("FSL_JAX_DATA"), "FSL_JAX_DATA")):
        if candidate:
            path = Path(candidate).expanduser()
            if not path.is_dir():
                problem = "is a file, not the folder that holds the Omniglot zips" if path.exists() else "does not exist"
                raise DataError(f"data directory {path} (from {origin}) {problem}")
            return path
    for shared in (Path.cwd().parent / "shared" / "data", Path(__file__).resolve().parents[3] / "shared" / "data"):
        if shared.is_dir():
            return shared
    raise DataError(
        "no data directory: pass --data-dir, set FSL_JAX_DATA, or keep the data in ../shared/data. "
        "To get Omniglot run `fsl-jax data download omniglot --data-dir DIR` (official zips, "
        "checksums verified) or install the `data` extra to read it through tensorflow-datasets.")


def omniglot_zips(root: Path, names=SMALL_BACKGROUND) -> list[Path]:
    """The Omniglot zips ``names`` (``data.zips``) under ``root/omniglot`` (or ``root`` itself)."""
    names = sorted(set(names))
    if not names:
        raise DataError("data.zips names no Omniglot zip")
    for folder in (root / "omniglot", root):
        found = [folder / name for name in names if (folder / name).is_file()]
        if found and len(found) < len(names):
            missing = sorted(set(names) - {path.name for path in found})
            raise DataError(f"{folder} holds {[path.name for path in found]} but not {missing} (data.zips); "
                            "run `fsl-jax data download omniglot`, or name only the zips you have")
        if found:
            return found
    raise DataError(f"no Omniglot zip of {names} (data.zips) in {root / 'omniglot'} or {root}; "
                    "run `fsl-jax data download omniglot`")


@dataclasses.dataclass(frozen=True)
class CharacterSet:
    """Characters with all their drawers: ``images[c, d]`` is drawer ``d+1`` of class ``c``."""

    images: np.ndarray  # [classes, 20, H, W] float32, strokes = 1
    alphabets: tuple[str, ...]  # per class
    characters: tuple[str, ...]  # per class, e.g. "character07"

    def __post_init__(self):
        if self.images.ndim != 4 or len(self.alphabets) != len(self.images):
            raise DataError(f"CharacterSet images must be [classes, drawers, H, W], got {self.images.shape}")

    @property
    def num_classes(self) -> int:
        return len(self.images)

    def select(self, alphabets=None, exclude=None) -> "CharacterSet":
        """The classes of the given alphabets (or all but ``exclude``); unknown names raise."""
        for argument, names in (("alphabets", alphabets), ("exclude", exclude)):
            if isinstance(names, str):
                raise DataError(f"{argument} must be a list of alphabet names, got the string {names!r}")
        known = set(self.alphabets)
        for name in (*(alphabets or ()), *(exclude or ())):
            if name not in known:
                raise DataError(f"unknown alphabet {name!r}; known: {sorted(str(a) for a in known)}")
        keep = [i for i, a in enumerate(self.alphabets)
                if (alphabets is None or a in alphabets) and a not in (exclude or ())]
        return CharacterSet(self.images[keep], tuple(self.alphabets[i] for i in keep),
                            tuple(self.characters[i] for i in keep))

    def drawer_indices(self, drawers) -> np.ndarray:
        """0-based indices of ``drawers`` (numbers from 1), in the order given; each at most once, as a
        drawer picked twice would show a support image again as its own query."""
        numbers, available = [int(d) for d in drawers], self.images.shape[1]
        if not numbers or len(set(numbers)) != len(numbers) or not all(1 <= d <= available for d in numbers):
            raise DataError(f"drawers must be distinct numbers in 1..{available}, got {numbers}")
        return np.array(numbers, np.int64) - 1

    def resized(self, size: int) -> "CharacterSet":
        """Area-resample every image to ``size`` x ``size`` (PIL box filter)."""
        if size == self.images.shape[-1]:
            return self
        flat = self.images.reshape(-1, *self.images.shape[2:])
        out = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BOX)) for im in flat])
        return dataclasses.replace(self, images=out.reshape(*self.images.shape[:2], size, size))


def _decode_png(data: bytes, name: str) -> np.ndarray:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as err:  # PIL raises several types for broken files
        raise DataError(f"corrupt image {name}: {err}") from err
    array = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    if array.shape != (NATIVE_SIZE, NATIVE_SIZE):
        raise DataError(f"image {name} is {array.shape[1]}x{array.shape[0]}, Omniglot images are "
                        f"{NATIVE_SIZE}x{NATIVE_SIZE}")
    return 1.0 - array  # strokes are black on white in the files


def read_zips(zips: list[Path]) -> CharacterSet:
    """Decode the zips, deduplicating characters that appear in several (by alphabet, character)."""
    chars: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for path in zips:
        try:
            archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as err:
            raise DataError(f"cannot read Omniglot zip {path}: {err}") from err
        with archive:
            for name in archive.namelist():
                match = _PNG.match(name)
                if match is None:
                    continue
                key = (match["alphabet"], match["character"])
                drawers = chars.setdefault(key, {})
                drawer = int(match["drawer"])
                if drawer not in drawers:
                    try:
                        data = archive.read(name)
                    except (zipfile.BadZipFile, OSError, zlib.error) as err:
                        raise DataError(f"cannot read {name} in the Omniglot zip {path}: {err}") from err
                    drawers[drawer] = _decode_png(data, f"{path.name}:{name}")
    if not chars:
        raise DataError(f"no Omniglot images found in {[str(z) for z in zips]}")
    keys = sorted(chars)
    for key in keys:
        if sorted(chars[key]) != list(range(1, DRAWERS + 1)):
            raise DataError(f"character {'/'.join(key)} has drawers {sorted(chars[key])}, expected 1..{DRAWERS}")
    images = np.stack([np.stack([chars[k][d] for d in range(1, DRAWERS + 1)]) for k in keys])
    return CharacterSet(images.astype(np.float32), tuple(k[0] for k in keys), tuple(k[1] for k in keys))


def _cache_dir() -> Path:
    return Path(os.environ.get("FSL_JAX_CACHE", Path.home() / ".cache" / "fsl_jax"))


def load_omniglot(data_dir=None, image_size: int = 28, zips=SMALL_BACKGROUND) -> CharacterSet:
    """The Omniglot characters of the zips named ``zips`` under the data root, decoded once and
    cached, at ``image_size``."""
    zips = omniglot_zips(data_root(data_dir), zips)
    fingerprint = hashlib.sha1(repr([(z.name, z.stat().st_size, z.stat().st_mtime_ns) for z in zips]).encode()).hexdigest()[:16]
    cache = _cache_dir() / f"omniglot-{fingerprint}-{image_size}.npz"
    if cache.exists():
        try:
            with np.load(cache) as f:
                return CharacterSet(f["images"], tuple(f["alphabets"]), tuple(f["characters"]))
        except (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile):
            pass  # a damaged cache (empty, truncated, not an .npz) is rebuilt from the zips below
    chars = read_zips(zips).resized(image_size)
    cache.parent.mkdir(parents=True, exist_ok=True)
    # a temporary file of this process's own, then an atomic rename: a killed process never leaves a
    # half-written cache, and processes building the same cache at once never take each other's file
    handle, tmp = tempfile.mkstemp(dir=cache.parent, prefix=f".{cache.stem}-", suffix=".npz")
    with os.fdopen(handle, "wb") as f:
        np.savez(f, images=chars.images, alphabets=np.array(chars.alphabets), characters=np.array(chars.characters))
    os.replace(tmp, cache)
    return chars


def split(chars: CharacterSet, test_alphabets=DEFAULT_TEST_ALPHABETS) -> tuple[CharacterSet, CharacterSet]:
    """Alphabet-disjoint (train, test) split."""
    test_alphabets = tuple(test_alphabets)
    return chars.select(exclude=test_alphabets), chars.select(alphabets=test_alphabets)
