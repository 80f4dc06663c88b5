"""Getting Omniglot: the official zips (checksums verified) or tensorflow-datasets."""
from __future__ import annotations

import hashlib
import os
import urllib.request
from pathlib import Path

import numpy as np

from fsl_jax.data.omniglot import CharacterSet
from fsl_jax.errors import DataError

_URL = "https://github.com/brendenlake/omniglot/raw/master/python/"
# (bytes, sha256) of Lake's release, as tensorflow-datasets records them.
OMNIGLOT_ZIPS = {
    "images_background.zip": (9464212, "ad41ab679c8b5d90b271ef46be6987cc81211774a695c29dcc5367b2b26ee640"),
    "images_evaluation.zip": (6462886, "1f61a8f3366785b057fc117d9228e78a16e3d976c8953b2a10fcc74cf0609cee"),
    "images_background_small1.zip": (1319022, "f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4"),
    "images_background_small2.zip": (1580917, "3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f"),
}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path) -> None:
    """Raise unless ``path`` is one of the official zips, byte for byte."""
    size, expected = OMNIGLOT_ZIPS[path.name]
    if path.stat().st_size != size or sha256(path) != expected:
        raise DataError(f"{path} does not match the official {path.name} (sha256 {expected})")


def download_omniglot(data_dir: str | Path, names=tuple(OMNIGLOT_ZIPS)) -> list[Path]:
    """Fetch the official zips into ``data_dir/omniglot``, verifying each; existing good files are kept."""
    folder = Path(data_dir) / "omniglot"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        if name not in OMNIGLOT_ZIPS:
            raise DataError(f"unknown Omniglot file {name!r}; official files: {sorted(OMNIGLOT_ZIPS)}")
        path = folder / name
        if not path.exists():
            partial = path.with_suffix(".part")
            try:
                urllib.request.urlretrieve(_URL + name, partial)
            except OSError as err:  # urllib's URLError included
                partial.unlink(missing_ok=True)
                raise DataError(f"cannot download {_URL + name}: {err}; without a network, copy the official "
                                f"zips into {folder}") from err
            except BaseException:  # interrupted (Ctrl-C): nothing is left either
                partial.unlink(missing_ok=True)
                raise
            os.replace(_checked(partial, name), path)
        else:
            verify(path)
        paths.append(path)
    return paths


def _checked(partial: Path, name: str) -> Path:
    size, expected = OMNIGLOT_ZIPS[name]
    if partial.stat().st_size != size or sha256(partial) != expected:
        partial.unlink()
        raise DataError(f"download of {name} failed its checksum (expected sha256 {expected}); nothing was kept")
    return partial


def from_tfds(splits=("small1", "small2"), data_dir: str | None = None) -> CharacterSet:
    """Omniglot through tensorflow-datasets (``pip install fsl_jax[data]``), deduplicated like the zips.

    Only data already prepared in ``data_dir`` (tensorflow-datasets' default folder if None) is read:
    nothing is downloaded.

    tensorflow-datasets keeps no drawer numbers: ``images[c, d]`` is the d-th image of character c in
    the dataset's order, not drawer d+1 as from the zips (the classification samplers draw drawers at
    random, so they are unaffected; a sampler given drawer numbers gets other drawers than Lake's).
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise DataError("tensorflow-datasets is not installed: pip install 'fsl_jax[data]'") from err
    chars: dict[tuple[str, int], list[np.ndarray]] = {}
    for split_name in splits:
        try:
            dataset, info = tfds.load("omniglot", split=split_name, data_dir=data_dir, with_info=True, download=False)
        except Exception as err:  # tfds raises many kinds (unprepared data, a missing module, a bad folder)
            raise DataError(f"tensorflow-datasets could not load omniglot {split_name!r} (data_dir {data_dir}): "
                            f"{type(err).__name__}: {str(err).rstrip('.')}; data.source: tfds downloads nothing; "
                            f"prepare the data once (this downloads) with: python -c \"import tensorflow_datasets as tfds; "
                            f"tfds.builder('omniglot', data_dir={data_dir!r}).download_and_prepare()\"") from err
        alphabet_name = info.features["alphabet"].int2str
        for example in tfds.as_numpy(dataset):
            key = (alphabet_name(example["alphabet"]), int(example["alphabet_char_id"]))
            images = chars.setdefault(key, [])
            if len(images) < 20:  # the same character from a second split is a duplicate
                images.append(1.0 - example["image"][..., 0].astype(np.float32) / 255.0)
    keys = sorted(chars)
    return CharacterSet(np.stack([np.stack(chars[k]) for k in keys]), tuple(k[0] for k in keys),
                        tuple(f"character{k[1] + 1:02d}" for k in keys))
