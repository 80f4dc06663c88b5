"""Segmentation through the one training loop and the CLI: configs, learning, eval JSON and PNG, fixed sets."""
from __future__ import annotations

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest

from fsl_jax import metrics
from fsl_jax.cli import main
from fsl_jax.config import DEFAULTS, TASK_DEFAULTS, load_config
from fsl_jax.errors import ConfigError
from fsl_jax.tasks import TASKS
from fsl_jax.train import Experiment, read_metrics, restore_params, train

TINY_CLUTTER = ["method_options={widths: [4, 8]}", "data.name=cluttered_omniglot",
                "data.scene_size=32", "data.exemplar_size=16", "data.char_size=12", "data.distractors=[2, 4]",
                "episode.tasks=2", "eval.distractors=[1, 3]", "eval.episodes=4", "eval.curve_episodes=2",
                "eval.every=2", "eval.pictures=2", "train.steps=2", "train.log_every=1", "train.checkpoint_every=2"]


def test_segmenter_configs_that_cannot_train_fail_before_the_run_directory(tmp_path):
    for extra, message in [(["backbone=resnet12"], "method 'siamese_unet' builds its own network"),
                           (["episode.tasks=1", "method_options={widths: [4, 8], contrast_weight: 1.0}"],
                            "compares the tasks of a batch .*: episode.tasks must be at least 2, got 1"),
                           (["method=protonet", "method_options={}"], "method 'protonet' is a classifier")]:
        config = load_config(None, ["method=siamese_unet", *TINY_CLUTTER, f"out={tmp_path / 'run'}", *extra])
        with pytest.raises(ConfigError, match=message):
            train(config, progress=False)
    assert not (tmp_path / "run").exists()


def test_every_task_kind_has_config_blocks():
    assert set(TASKS) == {DEFAULTS["data"]["name"], *TASK_DEFAULTS}
    config = load_config(None, ["data.name=omniglot_seg", "episode.shots=5"])
    assert config["episode"] == {"shots": 5, "queries": 2, "tasks": 4} and "distractors" in config["data"]
    with pytest.raises(ConfigError, match="unknown config key 'episode.ways'"):
        load_config(None, ["data.name=cluttered_omniglot", "episode.ways=5"])
    with pytest.raises(ConfigError, match="unknown data.name 'pascal'"):
        load_config(None, ["data.name=pascal"])


@pytest.mark.slow
def test_cli_trains_and_evaluates_a_cluttered_run(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("method: siamese_unet\n")
    args = ["train", "--config", str(tmp_path / "c.yaml"), "--no-progress", "--set", f"out={tmp_path / 'run'}"]
    for item in TINY_CLUTTER:
        args += ["--set", item]
    assert main(args) == 0
    records = read_metrics(tmp_path / "run")
    assert {"loss", "iou", "accuracy", "sampler_episodes_per_s"} <= set(records[0])
    assert [r["step"] for r in records if r["split"] == "test"] == [2]
    capsys.readouterr()

    assert main(["eval", "--run", str(tmp_path / "run"), "--no-progress", "--distractors", "2", "5"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["iou_by_distractors"]) == {"2", "5"} and result["episodes"] == 4
    for key in ("iou", "miou", "fb_iou", "pixel_accuracy", "precision", "recall", "f1"):
        assert 0.0 <= result[key] <= 1.0
    assert (tmp_path / "run" / "eval.png").stat().st_size > 5000 and result["picture"].endswith("eval.png")

    assert main(["eval", "--run", str(tmp_path / "run"), "--ways", "5"]) == 1
    assert "ways cannot be set for cluttered_omniglot episodes" in capsys.readouterr().err

    assert main(["data", "cluttered-sets", "--out", str(tmp_path / "sets"), "--episodes", "3", "--distractors", "4"]) == 0
    capsys.readouterr()
    before = (tmp_path / "sets" / "distractors_4" / "query_x.npy").read_bytes()
    for args, message in [(["--distractors", "4"], "distractors_4 already exists; pass --force"),
                          (["--distractors", "8", "-1", "--force"], "distractors"),
                          (["--episodes", "0"], "--episodes must be at least 1")]:
        assert main(["data", "cluttered-sets", "--out", str(tmp_path / "sets"), "--episodes", "3", *args]) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "sets" / "distractors_8").exists()  # no level is written before every level is valid
    assert (tmp_path / "sets" / "distractors_4" / "query_x.npy").read_bytes() == before
    assert main(["eval", "--run", str(tmp_path / "run"), "--no-progress", "--episodes-dir",
                 str(tmp_path / "sets" / "distractors_4"), "--picture", str(tmp_path / "fixed.png")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["episodes"] == 3 and set(result["iou_by_distractors"]) == {"4"}
    fixed = str(tmp_path / "sets" / "distractors_4")
    assert main(["eval", "--run", str(tmp_path / "run"), "--episodes-dir", fixed, "--episodes", "4"]) == 1
    assert "--episodes 4 is more than the 3 episodes in" in capsys.readouterr().err
    grey = tmp_path / "sets" / "grey"
    grey.mkdir()
    for field in ("support_x", "query_x", "support_mask", "query_mask", "classes", "distractors"):
        array = np.load(tmp_path / "sets" / "distractors_4" / f"{field}.npy")
        np.save(grey / f"{field}.npy", array[..., :1] if field.endswith("_x") else array)
    assert main(["eval", "--run", str(tmp_path / "run"), "--episodes-dir", str(grey)]) == 1
    assert "holds 1-channel images; " in capsys.readouterr().err
    (tmp_path / "sets" / "distractors_4" / "classes.npy").write_text("garbage")
    assert main(["eval", "--run", str(tmp_path / "run"), "--episodes-dir", fixed]) == 1
    assert re.search(r"cannot read .*classes\.npy as a numpy array", capsys.readouterr().err)


@pytest.mark.slow
def test_a_short_segmentation_run_learns(tmp_path):
    """The prototype segmenter on Omniglot scenes: after a short run it beats the best constant
    prediction (everything foreground) and its own untrained start by a clear margin."""
    config = load_config(None, [
        "method=prototype_segmenter", "backbone=unet", "backbone_options={widths: [8, 16], outputs: 16}",
        "data.name=omniglot_seg", "data.scene_size=32", "data.char_size=12", "data.distractors=[1]",
        "episode.tasks=4", "eval.episodes=60", "eval.every=1000", "eval.curve_episodes=10",
        "optim.lr=3e-3", "train.steps=60", "train.log_every=20", "train.checkpoint_every=60", f"out={tmp_path / 'run'}"])
    experiment = Experiment(config)
    sampler = experiment.eval_sampler()
    untrained = experiment.evaluate(experiment.init_params(), sampler, 60, progress=False)["iou"]
    params, _ = restore_params(train(config, progress=False), experiment)
    learned = experiment.evaluate(params, sampler, 60, progress=False)["iou"]
    batches = [sampler.sample(i) for i in range(6)]
    masks = np.concatenate([b.query_mask for b in batches])
    everything = float(jnp.mean(metrics.iou(metrics.confusion(np.ones_like(masks), masks, axes=(1, 2, 3)))))
    print(f"IoU learned {learned:.3f}, everything {everything:.3f}, untrained {untrained:.3f}")
    assert learned > max(2 * everything, untrained + 0.1), (learned, everything, untrained)
