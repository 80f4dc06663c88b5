"""Lake et al.'s one-shot classification runs: 20-way, within-alphabet, one training and one test
image of each character.

Layout: ``runNN/training/classNN.png``, ``runNN/test/itemNN.png`` and ``runNN/class_labels.txt``
with one line per test image, ``runNN/test/itemNN.png runNN/training/classNN.png``: paths from the
folder holding the runs, as in Lake's ``all_runs`` (paths from the run folder itself,
``test/itemNN.png``, are read too). Images are Omniglot PNGs (105x105).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from fsl_jax.data.episodes import Episode
from fsl_jax.data.omniglot import CharacterSet, _decode_png
from fsl_jax.errors import DataError


def _load(path: Path, image_size: int) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"missing image {path}")
    image = _decode_png(path.read_bytes(), str(path))
    if image_size != image.shape[0]:
        image = np.asarray(Image.fromarray(image).resize((image_size, image_size), Image.BOX))
    return image[..., None]


def read_run(run_dir: Path, image_size: int = 28) -> Episode:
    """One run as a single-task :class:`Episode` (leading axis 1), shots=1, one query per class."""
    labels_file = run_dir / "class_labels.txt"
    if not labels_file.is_file():
        raise DataError(f"{labels_file} is missing: not a one-shot run directory")
    pairs = [line.split() for line in labels_file.read_text().splitlines() if line.strip()]
    if not pairs or any(len(p) != 2 for p in pairs):
        raise DataError(f"{labels_file}: one line per test image, '{run_dir.name}/test/itemNN.png "
                        f"{run_dir.name}/training/classNN.png'")
    classes = sorted({train for _, train in pairs})
    for folder, listed in (("training", classes), ("test", [test for test, _ in pairs])):
        found = len(list((run_dir / folder).glob("*.png")))
        if found != len(listed):
            raise DataError(f"{labels_file} names {len(listed)} {folder} images but {run_dir / folder} holds {found}")
    index = {name: i for i, name in enumerate(classes)}
    where = lambda name: (run_dir.parent if Path(name).parts[0] == run_dir.name else run_dir) / name
    support = np.stack([_load(where(name), image_size) for name in classes])
    query = np.stack([_load(where(test), image_size) for test, _ in pairs])
    return Episode(support_x=support[None], support_y=np.arange(len(classes), dtype=np.int32)[None],
                   query_x=query[None], query_y=np.array([index[t] for _, t in pairs], np.int32)[None],
                   classes=np.arange(len(classes), dtype=np.int32)[None])


def read_runs(directory: str | Path, image_size: int = 28) -> list[Episode]:
    """Every ``run*`` folder of ``directory``, in name order."""
    runs = sorted(p for p in Path(directory).glob("run*") if p.is_dir())
    if not runs:
        raise DataError(f"no run* folders with class_labels.txt in {directory}")
    return [read_run(r, image_size) for r in runs]


def write_runs(chars: CharacterSet, directory: str | Path, runs: int = 20, ways: int = 20, seed: int = 0) -> Path:
    """Write runs in Lake's layout from native-size characters: each run picks one alphabet with at
    least ``ways`` characters, ``ways`` of its characters, and two different drawers per character."""
    if chars.images.shape[-1] != 105:
        raise DataError("write_runs needs native 105x105 images (load_omniglot(image_size=105))")
    rng = np.random.default_rng(seed)
    by_alphabet = {}
    for i, a in enumerate(chars.alphabets):
        by_alphabet.setdefault(a, []).append(i)
    eligible = sorted(a for a, idx in by_alphabet.items() if len(idx) >= ways)
    if not eligible:
        raise DataError(f"no alphabet has {ways} characters for a within-alphabet run")
    directory = Path(directory)
    for r in range(1, runs + 1):
        alphabet = eligible[(r - 1) % len(eligible)]
        picked = rng.choice(by_alphabet[alphabet], ways, replace=False)
        run = directory / f"run{r:02d}"
        (run / "training").mkdir(parents=True, exist_ok=True)
        (run / "test").mkdir(exist_ok=True)
        order = rng.permutation(ways)
        lines = []
        for j, c in enumerate(picked):
            train_drawer, test_drawer = rng.choice(20, 2, replace=False)
            save = lambda img, path: Image.fromarray(((1 - img) * 255).astype(np.uint8)).save(path)
            save(chars.images[c, train_drawer], run / "training" / f"class{j + 1:02d}.png")
            save(chars.images[c, test_drawer], run / "test" / f"item{order[j] + 1:02d}.png")
            test, training = f"test/item{order[j] + 1:02d}.png", f"training/class{j + 1:02d}.png"
            lines.append((order[j] + 1, f"{run.name}/{test} {run.name}/{training}"))
        (run / "class_labels.txt").write_text("\n".join(line for _, line in sorted(lines)) + "\n")
    return directory
