"""Omniglot loading, splits, episode sampling and Lake's one-shot runs."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fsl_jax.data.download import OMNIGLOT_ZIPS, _checked, verify
from fsl_jax.data.episodes import EpisodeSampler, with_rotations
from fsl_jax.data.lake_runs import read_runs, write_runs
from fsl_jax.data.omniglot import DEFAULT_TEST_ALPHABETS, SMALL_BACKGROUND, data_root, load_omniglot, read_zips, split
from fsl_jax.errors import DataError


def test_background_sets_are_deduplicated(omniglot28):
    assert omniglot28.num_classes == 242
    assert len(set(omniglot28.alphabets)) == 8
    assert omniglot28.images.shape == (242, 20, 28, 28)
    pairs = list(zip(omniglot28.alphabets, omniglot28.characters))
    assert len(set(pairs)) == len(pairs)
    # strokes are 1 on a 0 background: most pixels are background
    assert 0.0 <= omniglot28.images.min() and omniglot28.images.max() <= 1.0
    assert omniglot28.images.mean() < 0.3


def test_split_is_alphabet_disjoint(omniglot28):
    train, test = split(omniglot28)
    assert set(test.alphabets) == set(DEFAULT_TEST_ALPHABETS)
    assert not set(train.alphabets) & set(test.alphabets)
    assert train.num_classes + test.num_classes == 242
    with pytest.raises(DataError, match="Klingon"):
        split(omniglot28, ["Klingon"])


def _png_bytes(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_corrupt_png_is_named(tmp_path):
    good = _png_bytes(np.full((105, 105), 255, np.uint8))
    path = tmp_path / "images_background_tiny.zip"
    with zipfile.ZipFile(path, "w") as z:
        for d in range(1, 21):
            z.writestr(f"images_background_tiny/Alpha/character01/0001_{d:02d}.png", good)
        z.writestr("images_background_tiny/Alpha/character02/0002_01.png", b"\x89PNG not really")
    with pytest.raises(DataError, match="character02/0002_01.png"):
        read_zips([path])


def test_damaged_zip_member_is_named(tmp_path):
    path = tmp_path / "images_background_tiny.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for d in range(1, 21):
            z.writestr(f"images_background_tiny/Alpha/character01/0001_{d:02d}.png",
                       _png_bytes(np.full((105, 105), 255 - d, np.uint8)))
    raw = bytearray(path.read_bytes())
    at = raw.index(b"IDAT") + 8  # inside the first member's pixel data: its CRC-32 no longer matches
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"cannot read .*0001_01.png in the Omniglot zip .*tiny.zip"):
        read_zips([path])


def test_a_damaged_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("FSL_JAX_CACHE", str(tmp_path / "cache"))
    chars = load_omniglot(None, 14)
    [cache] = (tmp_path / "cache").glob("omniglot-*-14.npz")
    plain_npy = io.BytesIO()
    np.save(plain_npy, np.zeros(3))
    for damage in (b"not an npz", b"", plain_npy.getvalue()):
        cache.write_bytes(damage)
        again = load_omniglot(None, 14)
        np.testing.assert_array_equal(again.images, chars.images)
        assert np.load(cache)["images"].shape == chars.images.shape
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [cache.name]  # no temporary file left


def test_missing_drawers_are_reported(tmp_path):
    good = _png_bytes(np.full((105, 105), 255, np.uint8))
    path = tmp_path / "images_background_tiny.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("images_background_tiny/Alpha/character01/0001_01.png", good)
    with pytest.raises(DataError, match="Alpha/character01"):
        read_zips([path])


def test_data_root_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("FSL_JAX_DATA", str(tmp_path))
    assert data_root() == tmp_path
    assert data_root(tmp_path / ".") == tmp_path
    with pytest.raises(DataError, match="does-not-exist.*--data-dir"):
        data_root(tmp_path / "does-not-exist")
    (tmp_path / "images_background_small1.zip").write_bytes(b"")
    with pytest.raises(DataError, match="is a file, not the folder that holds the Omniglot zips"):
        data_root(tmp_path / "images_background_small1.zip")
    monkeypatch.setenv("FSL_JAX_DATA", str(tmp_path / "gone"))
    with pytest.raises(DataError, match="FSL_JAX_DATA"):
        data_root()


def test_empty_data_dir_says_how_to_get_data(tmp_path):
    with pytest.raises(DataError, match="fsl-jax data download omniglot"):
        load_omniglot(tmp_path)


def test_only_the_named_zips_are_read_so_lakes_evaluation_set_stays_out_of_training(tmp_path):
    """A data folder after `fsl-jax data download` also holds images_evaluation.zip, the alphabets of
    Lake's original runs: by default only the two small background sets are read."""
    for name in SMALL_BACKGROUND:
        (tmp_path / name).symlink_to(data_root() / "omniglot" / name)
    (tmp_path / "images_evaluation.zip").write_bytes(b"not read")
    assert load_omniglot(tmp_path, 14).num_classes == 242
    with pytest.raises(DataError, match=r"holds \['images_background_small1.zip'\] but not \['images_background.zip'\]"):
        load_omniglot(tmp_path, 14, ("images_background_small1.zip", "images_background.zip"))
    with pytest.raises(DataError, match="no Omniglot zip of"):
        load_omniglot(tmp_path, 14, ("images_background.zip",))


def test_checksum_rejects_a_wrong_file_and_keeps_nothing(tmp_path):
    fake = tmp_path / "images_background_small1.part"
    fake.write_bytes(b"x" * OMNIGLOT_ZIPS["images_background_small1.zip"][0])
    with pytest.raises(DataError, match="checksum"):
        _checked(fake, "images_background_small1.zip")
    assert not fake.exists()


def test_download_without_a_network_is_one_clear_error(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    from fsl_jax.data.download import download_omniglot

    def offline(url, path):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlretrieve", offline)
    with pytest.raises(DataError, match=r"cannot download .*images_background.*zip: .*no route to host.*copy the official zips"):
        download_omniglot(tmp_path)
    assert not list((tmp_path / "omniglot").iterdir())

    def interrupted(url, path):
        Path(path).write_bytes(b"the first kilobyte" * 60)
        raise KeyboardInterrupt

    monkeypatch.setattr(urllib.request, "urlretrieve", interrupted)
    with pytest.raises(KeyboardInterrupt):
        download_omniglot(tmp_path)
    assert not list((tmp_path / "omniglot").iterdir())


def test_bundled_zips_are_the_official_ones():
    for path in sorted((data_root() / "omniglot").glob("images_background_small*.zip")):
        verify(path)


def test_sampler_shapes_labels_and_reproducibility(tiny_chars):
    sampler = EpisodeSampler(tiny_chars, ways=5, shots=2, queries=3, tasks=4, seed=7)
    episode = sampler.sample(3)
    assert episode.support_x.shape == (4, 10, 28, 28, 1)
    assert episode.query_x.shape == (4, 15, 28, 28, 1)
    assert episode.classes.shape == (4, 5) and episode.ways == 5
    np.testing.assert_array_equal(episode.support_y[0], np.repeat(np.arange(5), 2))
    np.testing.assert_array_equal(episode.query_y[0], np.repeat(np.arange(5), 3))
    for t in range(4):
        assert len(set(episode.classes[t])) == 5
        # each support image really is an image of its way's class, and support/query drawers differ
        for i, y in enumerate(episode.support_y[t]):
            cls = episode.classes[t, y]
            assert any(np.array_equal(episode.support_x[t, i, ..., 0], im) for im in tiny_chars.images[cls])
        flat = lambda x: {x[i].tobytes() for i in range(len(x))}
        assert not flat(episode.support_x[t]) & flat(episode.query_x[t])
    again = EpisodeSampler(tiny_chars, ways=5, shots=2, queries=3, tasks=4, seed=7).sample(3)
    for a, b in zip(episode, again):
        np.testing.assert_array_equal(a, b)
    other = sampler.sample(4)
    assert not np.array_equal(episode.classes, other.classes)


@pytest.mark.parametrize("kwargs, message", [
    (dict(ways=13, shots=1, queries=1), "ways=13 is larger than the 12 classes"),
    (dict(ways=5, shots=15, queries=6), "shots\\+queries=21 is larger than the 20 images per class"),
    (dict(ways=5, shots=0, queries=6), "shots must be at least 1"),
])
def test_sampler_rejects_impossible_episodes(tiny_chars, kwargs, message):
    with pytest.raises(DataError, match=message):
        EpisodeSampler(tiny_chars, **kwargs)


@pytest.mark.parametrize("drawers", [(0, 1), (1, 21), (3, 3), ()])
def test_sampler_drawers_are_distinct_and_in_range(tiny_chars, drawers):
    """Drawer 0 would read drawer 20 (index -1), and a drawer given twice would repeat a support image as its query."""
    with pytest.raises(DataError, match=r"drawers must be distinct numbers in 1..20, got \[" + ", ".join(map(str, drawers))):
        EpisodeSampler(tiny_chars, ways=2, shots=1, queries=1, drawers=drawers)
    assert EpisodeSampler(tiny_chars, ways=2, shots=1, queries=1, drawers=(20, 1)).images.shape[1] == 2


def test_select_takes_lists_and_refuses_a_string(tiny_chars):
    assert set(tiny_chars.select(alphabets=["alpha0", "alpha2"]).alphabets) == {"alpha0", "alpha2"}
    assert set(tiny_chars.select(exclude=["alpha0"]).alphabets) == {"alpha1", "alpha2"}
    with pytest.raises(DataError, match="alphabets must be a list of alphabet names, got the string 'alpha0'"):
        tiny_chars.select(alphabets="alpha0")


def test_rotations_are_new_classes(tiny_chars):
    rotated = with_rotations(tiny_chars)
    assert rotated.num_classes == 4 * tiny_chars.num_classes
    np.testing.assert_array_equal(rotated.images[12 + 3], np.rot90(tiny_chars.images[3], 1, axes=(-2, -1)))
    assert rotated.characters[12 + 3].endswith("@rot90")


def test_lake_runs_round_trip(omniglot105, tmp_path):
    _, held_out = split(omniglot105)
    write_runs(held_out, tmp_path, runs=3, seed=1)
    labels = tmp_path / "run01" / "class_labels.txt"
    lines = labels.read_text().splitlines()
    # Lake's all_runs: paths from the folder holding the runs, which his scripts open as written
    assert len(lines) == 20 and lines[0].startswith("run01/test/item01.png run01/training/class")
    runs = read_runs(tmp_path, image_size=28)
    assert len(runs) == 3
    run = runs[0]
    assert run.support_x.shape == (1, 20, 28, 28, 1) and run.query_x.shape == (1, 20, 28, 28, 1)
    assert sorted(run.query_y[0].tolist()) == list(range(20))
    labels.write_text("\n".join(line.replace("run01/", "") for line in lines))  # paths from the run folder
    for a, b in zip(read_runs(tmp_path, image_size=28)[0], run):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(DataError, match="class_labels.txt"):
        read_runs(tmp_path / "run01" / "training")
    labels.write_text("\n".join(lines[:19]))
    with pytest.raises(DataError, match=r"names 19 training images but .*run01/training holds 20"):
        read_runs(tmp_path)
    labels.write_text("\n")
    with pytest.raises(DataError, match="one line per test image"):
        read_runs(tmp_path)


def test_the_readme_table_names_what_its_modules_export():
    """The README's method table: SegEpisode and UNet import from the packages it names, and
    fomaml, anil and metasgd are `maml` with the options it gives."""
    from fsl_jax import meta
    from fsl_jax.data import SegEpisode
    from fsl_jax.data.segmentation import SegEpisode as defined
    from fsl_jax.methods import METHODS
    from fsl_jax.nets import UNet
    from fsl_jax.nets.decoders import UNet as unet

    assert SegEpisode is defined and UNet is unet
    assert {name: (METHODS[name].func, METHODS[name].keywords) for name in ("fomaml", "anil", "metasgd")} == {
        "fomaml": (meta.maml, {"first_order": True}), "anil": (meta.maml, {"adapted": "head"}),
        "metasgd": (meta.maml, {"learn_inner_lr": True})}


def test_tfds_reads_its_data_with_the_pinned_packages(tmp_path):
    """tensorflow-datasets 4.9 finds its dataset code through importlib_resources, which the `data` extra
    installs (etils no longer brings it): without it every load of prepared data failed with
    ModuleNotFoundError. ``code_path`` is the lookup that needs it, reached here without any data."""
    tfds = pytest.importorskip("tensorflow_datasets")
    assert tfds.builder("omniglot", data_dir=str(tmp_path)).code_path.name == "omniglot.py"


def test_tfds_source_groups_and_deduplicates(monkeypatch):
    """from_tfds reads tensorflow-datasets' omniglot features; here a fake tfds serves two
    splits that share one alphabet, as small1 and small2 do."""
    import types

    from fsl_jax.data.download import from_tfds

    names = ["Greek", "Korean"]
    examples = {
        "small1": [dict(alphabet=0, alphabet_char_id=c, image=np.zeros((105, 105, 3), np.uint8)) for c in range(2) for _ in range(20)],
        "small2": [dict(alphabet=a, alphabet_char_id=0, image=np.full((105, 105, 3), 255, np.uint8)) for a in (0, 1) for _ in range(20)],
    }
    info = types.SimpleNamespace(features={"alphabet": types.SimpleNamespace(int2str=lambda i: names[i])})
    fake = types.SimpleNamespace(load=lambda name, split, data_dir, with_info, download: (examples[split], info),
                                 as_numpy=lambda d: d)
    monkeypatch.setitem(__import__("sys").modules, "tensorflow_datasets", fake)
    chars = from_tfds()
    assert chars.num_classes == 3  # Greek character 1 appears in both splits once
    assert chars.alphabets == ("Greek", "Greek", "Korean")
    assert chars.images.shape == (3, 20, 105, 105)
    assert chars.images[0].min() == 1.0 and chars.images[2].max() == 0.0  # black strokes become 1


def test_tfds_source_downloads_nothing(monkeypatch, tmp_path):
    """data.source: tfds reads prepared data only (the README: nothing is downloaded unless asked), and
    its error says how to prepare it; tensorflow-datasets' own default would download, offline for minutes."""
    import types

    from fsl_jax.data.download import from_tfds

    calls = []

    def load(name, **kwargs):
        calls.append(kwargs)
        raise AssertionError(f"Dataset {name}: could not find data in {kwargs['data_dir']}.")

    monkeypatch.setitem(__import__("sys").modules, "tensorflow_datasets", types.SimpleNamespace(load=load))
    with pytest.raises(DataError, match=r"could not find data in .*; data.source: tfds downloads nothing; .*"
                                        r"tfds.builder\('omniglot', data_dir='.*'\).download_and_prepare\(\)"):
        from_tfds(data_dir=str(tmp_path))
    assert calls == [dict(split="small1", data_dir=str(tmp_path), with_info=True, download=False)]
