"""FSS-1000 folder layout and segmentation episode checks: every bad input names itself."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fsl_jax.data.fss import SegmentationEpisodes, load_fss, open_image, split_classes, upright_size
from fsl_jax.data.segmentation import SegEpisode, check_episode
from fsl_jax.errors import ConfigError, DataError


def write_pair(folder: Path, n: int, size=(20, 16), mask_size=None, mask_values=(0, 255)):
    rng = np.random.default_rng([n, *folder.name.encode()])
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(folder / f"{n}.jpg")
    mw, mh = mask_size or size
    mask = np.full((mh, mw), mask_values[0], np.uint8)
    mask[mh // 4: mh // 2 + n % 3, mw // 4: mw // 2] = mask_values[1]
    Image.fromarray(mask).save(folder / f"{n}.png")


@pytest.fixture
def fss_root(tmp_path) -> Path:
    """A tiny folder in the FSS-1000 layout: 4 classes of 4 images (20x16) with 0/255 masks."""
    for c in ("bee", "cat", "kite", "zebra"):
        for n in range(1, 5):
            write_pair(tmp_path / "fss" / c, n)
    return tmp_path / "fss"


def test_loads_the_fss_layout(fss_root):
    data = load_fss(fss_root, image_size=12)
    assert data.classes == ("bee", "cat", "kite", "zebra")
    assert data.images.shape == (16, 12, 12, 3) and data.masks.shape == (16, 12, 12) and data.masks.dtype == bool
    np.testing.assert_array_equal(np.bincount(data.labels), [4, 4, 4, 4])
    train, test = split_classes(data)
    assert test.classes == ("zebra",) and "zebra" not in train.classes
    assert split_classes(data, ["cat"])[1].classes == ("cat",)


def test_fss_episodes_are_seeded_and_of_one_class(fss_root):
    data = load_fss(fss_root, image_size=12)
    sampler = SegmentationEpisodes(data, shots=2, queries=2, tasks=3, seed=4)
    episode = check_episode(sampler.sample(7))
    for x, y in zip(episode, SegmentationEpisodes(data, 2, 2, 3, seed=4).sample(7)):
        np.testing.assert_array_equal(x, y)
    assert episode.support_x.shape == (3, 2, 12, 12, 3) and episode.query_mask.shape == (3, 2, 12, 12)
    for task in range(3):  # all four images of the task come from its class, without repeats
        rows = [np.flatnonzero((data.images == (img * 255).round().astype(np.uint8)).all((1, 2, 3)))[0]
                for img in np.concatenate([episode.support_x[task], episode.query_x[task]])]
        assert len(set(rows)) == 4 and set(data.labels[rows]) == {episode.classes[task]}


def test_too_few_images_per_class_is_named(fss_root):
    with pytest.raises(DataError, match="class 'bee' has 4 images, fewer than shots\\+queries=5"):
        SegmentationEpisodes(load_fss(fss_root, 12), shots=3, queries=2)


@pytest.mark.parametrize("case, message", [
    ("orphan_mask", r"mask .*cat/9.png has no image .*cat/9.jpg"),
    ("other_file", r"file .*cat/notes.txt has no image"),
    ("subfolder", r"cat holds a folder, extra"),
    ("empty_class", r"class folder .*owl holds no <n>.jpg image"),
    ("sixteen_bit", r"mask .*cat/9.png is a I;16 image"),
    ("transparent", r"image .*cat/9.jpg has transparent pixels"),
    ("vanishes", r"mask .*cat/9.png has no foreground pixel left at 12x12"),
    ("mask_size", r"mask .*cat/9.png is 10x8 but its image .*cat/9.jpg is 20x16"),
    ("non_binary", r"mask .*cat/9.png is not binary: it holds values \[128\]"),
    ("colour", r"mask .*cat/9.png is a colour image: it holds the colours \[\(0, 0, 0\), \(128, 0, 0\)\]; a mask is binary"),
    ("empty", r"mask .*cat/9.png is empty"),
    ("missing_mask", r".*cat/9.jpg has no mask"),
    ("corrupt", r"cannot read .*cat/9.jpg"),
])
def test_bad_files_are_named(fss_root, case, message):
    folder = fss_root / "cat"
    write_pair(folder, 9)
    if case == "orphan_mask":
        (folder / "9.jpg").unlink()
    elif case == "other_file":
        (folder / "notes.txt").write_text("labels")
    elif case == "subfolder":
        (folder / "extra").mkdir()
    elif case == "empty_class":
        (fss_root / "owl").mkdir()
    elif case == "sixteen_bit":  # Pillow would clip 300 and 65535 to 255 on conversion: a binary-looking mask
        Image.fromarray(np.array([[0, 300] * 10, [65535, 0] * 10] * 8, np.uint16)).save(folder / "9.png")
    elif case == "transparent":
        Image.new("RGBA", (20, 16), (200, 0, 0, 0)).save(folder / "9.jpg", format="PNG")
    elif case == "vanishes":  # a one-pixel object, lost by nearest-neighbour resizing to 12x12
        mask = np.zeros((16, 20), np.uint8)
        mask[1, 1] = 255
        Image.fromarray(mask).save(folder / "9.png")
    elif case == "mask_size":
        write_pair(folder, 9, mask_size=(10, 8))
    elif case == "non_binary":
        write_pair(folder, 9, mask_values=(0, 128))
    elif case == "colour":  # a class-coloured mask (dark red, grey level 38): its colours, not its grey, are named
        mask = np.zeros((16, 20, 3), np.uint8)
        mask[4:8, 5:10] = (128, 0, 0)
        Image.fromarray(mask).save(folder / "9.png")
    elif case == "empty":
        write_pair(folder, 9, mask_values=(0, 0))
    elif case == "missing_mask":
        (folder / "9.png").unlink()
    else:
        (folder / "9.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=message):
        load_fss(fss_root, image_size=12)


def test_jpeg_suffixes_in_any_case_and_exif_rotation(fss_root):
    for n in range(1, 5):
        (fss_root / "bee" / f"{n}.jpg").rename(fss_root / "bee" / f"{n}.JPEG")
    y, x = np.mgrid[:16, :20]
    pixels = np.stack([x * 12, y * 15, np.full_like(x, 128)], -1).astype(np.uint8)  # smooth: little JPEG noise
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 20 wide, 16 high; shown turned a quarter clockwise: 16 wide, 20 high
    Image.fromarray(pixels).save(fss_root / "cat" / "9.jpg", exif=exif, quality=100)
    mask = np.zeros((20, 16), np.uint8)  # drawn on the picture as shown (a mask of the stored 20x16 would be refused)
    mask[:5] = 255
    Image.fromarray(mask).save(fss_root / "cat" / "9.png")
    data = load_fss(fss_root, image_size=12)
    assert data.classes == ("bee", "cat", "kite", "zebra")
    np.testing.assert_array_equal(np.bincount(data.labels), [4, 5, 4, 4])
    shown = data.images[list(data.labels).index(1) + 4].astype(float)  # cat/9, the fifth cat image
    at_12 = lambda a: np.asarray(Image.fromarray(np.ascontiguousarray(a)).resize((12, 12), Image.BILINEAR), float)
    assert np.abs(shown - at_12(np.rot90(pixels, -1))).mean() < 3 < np.abs(shown - at_12(np.rot90(pixels, 1))).mean()


@pytest.mark.parametrize("orientation, shown", [(1, (20, 16)), (3, (20, 16)), (6, (16, 20)), (8, (16, 20))])
def test_upright_size_reads_the_shown_size_from_the_header(tmp_path, orientation, shown):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.new("RGB", (20, 16)).save(tmp_path / "a.jpg", exif=exif)
    assert upright_size(tmp_path / "a.jpg") == open_image(tmp_path / "a.jpg").size == shown
    (tmp_path / "b.jpg").write_bytes(b"not a picture")
    with pytest.raises(DataError, match="cannot read .*b.jpg"):
        upright_size(tmp_path / "b.jpg")


def test_class_split_that_leaves_a_side_empty_is_named(fss_root):
    data = load_fss(fss_root, image_size=12)
    with pytest.raises(DataError, match="leaves no training class among the 4 classes"):
        split_classes(data, ["bee", "cat", "kite", "zebra"])
    with pytest.raises(DataError, match="leaves no test class among the 3 classes"):
        split_classes(data.select(["bee", "cat", "kite"]))
    with pytest.raises(DataError, match="must be a list of class names, got the string 'cat'"):
        split_classes(data, "cat")
    with pytest.raises(DataError, match="leaves no test class among the 4 classes"):
        split_classes(data, [])  # an empty list holds nothing out; None holds out every fourth class


def test_masks_of_zero_and_one_are_binary_too(tmp_path):
    write_pair(tmp_path / "a", 1, mask_values=(0, 1))
    write_pair(tmp_path / "a", 2, mask_values=(0, 1))
    assert load_fss(tmp_path, 8).masks.any()
    grey = np.asarray(Image.open(tmp_path / "a" / "1.png"))
    Image.fromarray(np.repeat(grey[..., None] * 255, 3, -1)).save(tmp_path / "a" / "1.png")  # white on black, RGB
    np.testing.assert_array_equal(load_fss(tmp_path, 16).masks[0],
                                  np.asarray(Image.fromarray(grey).resize((16, 16), Image.NEAREST)) == 1)


def test_hidden_and_system_entries_are_skipped_everywhere(fss_root):
    """A hidden folder is no class (not even one holding pairs), and what macOS, Jupyter and Windows leave
    behind stops nothing, in the root or in a class folder."""
    for n in (1, 2):
        write_pair(fss_root / ".Trash-1000", n)
    (fss_root / "__MACOSX" / "cat").mkdir(parents=True)
    (fss_root / "__MACOSX" / "cat" / "._1.jpg").write_bytes(b"AppleDouble")
    (fss_root / "cat" / "._1.jpg").write_bytes(b"AppleDouble")
    (fss_root / "cat" / ".ipynb_checkpoints").mkdir()
    for name in (".DS_Store", "desktop.ini", "Thumbs.db", "thumbs.db"):
        (fss_root / "kite" / name).write_text("x")
    data = load_fss(fss_root, image_size=12)
    assert data.classes == ("bee", "cat", "kite", "zebra")
    np.testing.assert_array_equal(np.bincount(data.labels), [4, 4, 4, 4])


@pytest.mark.parametrize("palette", [[0, 0, 0, 255, 255, 255], [255, 255, 255, 0, 0, 0], [0, 0, 0, 128, 0, 0]])
def test_palette_masks_are_read_by_their_indices_not_their_colours(tmp_path, palette):
    """A palette PNG (PASCAL VOC's masks) stores its labels as indices: 1 is the object whatever its colour."""
    write_pair(tmp_path / "a", 1, mask_values=(0, 1))
    indices = np.asarray(Image.open(tmp_path / "a" / "1.png"))
    mask = Image.fromarray(indices, "P")
    mask.putpalette(palette)
    mask.save(tmp_path / "a" / "1.png")
    np.testing.assert_array_equal(load_fss(tmp_path, 16, resize="stretch").masks[0],
                                  np.asarray(Image.fromarray(indices).resize((16, 16), Image.NEAREST)) == 1)
    mask = Image.fromarray(np.where(indices == 1, 3, 0).astype(np.uint8), "P")
    mask.putpalette(palette * 2)
    mask.save(tmp_path / "a" / "1.png")
    with pytest.raises(DataError, match=r"1.png is not binary: it holds palette indices \[3\]"):
        load_fss(tmp_path, 16)


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        load_fss(tmp_path / "nowhere")


def episode(support_mask=None, query_mask=None, query_tasks=2, scale=1.0, classes=(0, 0)):
    rng = np.random.default_rng(0)
    mask = np.zeros((2, 1, 8, 8), np.float32)
    mask[..., 2:5, 2:5] = 1
    return SegEpisode(support_x=rng.random((2, 1, 8, 8, 3), np.float32) * scale,
                      support_mask=mask if support_mask is None else support_mask,
                      query_x=rng.random((query_tasks, 3, 8, 8, 3), np.float32),
                      query_mask=np.zeros((query_tasks, 3, 8, 8), np.float32) if query_mask is None else query_mask,
                      classes=np.array(classes, np.int32), distractors=np.zeros(2, np.int32))


def test_episode_checks_name_the_bad_input():
    check_episode(episode())
    with pytest.raises(DataError, match=r"batch.support_mask is \(2, 1, 6, 8\) but its image is \(2, 1, 8, 8\)"):
        check_episode(episode(support_mask=np.ones((2, 1, 6, 8), np.float32)), "batch")
    with pytest.raises(DataError, match=r"episode.query_mask is not binary: it holds values \[0.5\]"):
        check_episode(episode(query_mask=np.full((2, 3, 8, 8), 0.5, np.float32)))
    empty = np.ones((2, 1, 8, 8), np.float32)
    empty[1] = 0
    with pytest.raises(DataError, match="support mask 0 of task 1 is empty"):
        check_episode(episode(support_mask=empty))
    with pytest.raises(DataError, match="support_x holds 2 tasks but query_x 3"):
        check_episode(episode(query_tasks=3))
    with pytest.raises(DataError, match=r"set.support_x holds values from 0.* to 2\d\d.*: images are float in \[0, 1\]"):
        check_episode(episode(scale=255.0), "set")
    with pytest.raises(DataError, match="episode.classes must be non-negative, got -1"):
        check_episode(episode(classes=(0, -1)))


def test_resize_stretches_or_pads_keeping_the_aspect_ratio(tmp_path):
    folder = tmp_path / "fss" / "kite"
    folder.mkdir(parents=True)
    Image.fromarray(np.full((10, 20, 3), 200, np.uint8)).save(folder / "1.jpg", quality=100)  # 20 wide, 10 high
    mask = np.zeros((10, 20), np.uint8)
    mask[:, 10:] = 255  # the right half
    Image.fromarray(mask).save(folder / "1.png")
    stretched = load_fss(tmp_path / "fss", image_size=8)
    assert stretched.masks[0].sum() == 32 and stretched.masks[0][:, 4:].all()
    assert np.abs(stretched.images[0].astype(int) - 200).max() <= 2
    padded = load_fss(tmp_path / "fss", image_size=8, resize="pad")
    image, mask = padded.images[0].astype(int), padded.masks[0]
    assert (image[:2] == 0).all() and (image[6:] == 0).all() and np.abs(image[2:6] - 200).max() <= 2
    assert not mask[:2].any() and not mask[6:].any() and mask[2:6, 4:].all() and not mask[2:6, :4].any()
    with pytest.raises(ConfigError, match=r"data.resize\) must be one of \['stretch', 'pad'\], got 'crop'"):
        load_fss(tmp_path / "fss", image_size=8, resize="crop")


def test_an_fss_config_loads_the_folder_as_configured(fss_root):
    from fsl_jax.config import load_config
    from fsl_jax.tasks import load_task

    config = load_config(None, ["data.name=fss", f"data.dir={fss_root}", "data.image_size=12", "data.resize=pad",
                                "method=prototype_segmenter", "episode.tasks=2", "eval.episodes=2"])
    task = load_task(config)
    batch = task.train_sampler.sample(0)
    assert task.num_train_classes == 3 and batch.support_x.shape[:2] == (2, 1) and batch.query_x.shape[2:] == (12, 12, 3)
    # the 20x16 pictures are padded into 12x12: the top and bottom rows are padding (black, background)
    assert not batch.support_x[:, :, :1].any() and not batch.support_mask[:, :, :1].any() and batch.support_x[:, :, 1].mean() > 0.2
    assert task.describe(task.eval_sampler(2)) == {"protocol": "fss", "shots": 1, "queries": 1, "classes": 1}


def test_segmentation_tasks_score_at_their_probability_threshold(fss_root):
    """eval.threshold reaches the evaluation (and its result); one outside (0, 1) is named."""
    import jax.numpy as jnp

    from fsl_jax.config import load_config
    from fsl_jax.learner import Learner
    from fsl_jax.tasks import load_task

    given = ["data.name=fss", f"data.dir={fss_root}", "data.image_size=12", "method=prototype_segmenter"]
    unsure = Learner(init=None, task_loss=None,  # every pixel at p = 0.4
                     task_predict=lambda params, task, rng: jnp.full(task.query_x.shape[:-1], np.log(0.4 / 0.6)))
    scores = {}
    for threshold in (0.5, 0.3):
        task = load_task(load_config(None, [*given, f"eval.threshold={threshold}"]))
        scores[threshold] = task.evaluate(unsure, None, task.eval_sampler(2), 2, False)
    assert scores[0.5]["iou"] == 0 < scores[0.3]["iou"] and [s["threshold"] for s in scores.values()] == [0.5, 0.3]
    assert load_config(None, given)["eval"]["threshold"] == 0.5
    with pytest.raises(ConfigError, match=r"eval.threshold must be a probability between 0 and 1 \(exclusive\), got 1.5"):
        load_config(None, [*given, "eval.threshold=1.5"])
    with pytest.raises(ConfigError, match=r"eval.threshold must be a probability between 0 and 1 \(exclusive\), got 0"):
        load_config(None, [*given, "eval.threshold=0"])
