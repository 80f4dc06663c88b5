"""Configs: defaults, YAML, overrides, and errors that name the bad key."""
from __future__ import annotations

from pathlib import Path

import pytest

from fsl_jax.config import DEFAULTS, eval_episode, load_config, parse_override
from fsl_jax.errors import ConfigError
from fsl_jax.methods import make_learner

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def test_overrides_are_yaml_typed():
    assert parse_override("optim.lr=3e-4") == {"optim": {"lr": 3e-4}}
    assert parse_override("data.rotations=false") == {"data": {"rotations": False}}
    config = load_config(None, ["episode.ways=7", "name=x"])
    assert config["episode"]["ways"] == 7 and config["out"] == "runs/x"
    assert eval_episode(config)["ways"] == 7
    assert DEFAULTS["episode"]["ways"] == 20  # defaults are not mutated


def test_config_file_name_names_the_run(tmp_path):
    path = tmp_path / "proto.yaml"
    path.write_text("method: protonet\nepisode: {ways: 5}\n")
    config = load_config(path)
    assert config["name"] == "proto" and config["episode"]["ways"] == 5


@pytest.mark.parametrize("override, message", [
    ("optim.lrate=1", "unknown config key 'optim.lrate'"),
    ("episodes.ways=5", "unknown config key 'episodes'"),
    ("episode=5", "must be a mapping"),
    ("noequals", "key=value"),
])
def test_unknown_or_malformed_keys_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_an_override_inside_an_option_block_keeps_the_other_options(tmp_path):
    path = tmp_path / "maml.yaml"
    path.write_text("method: maml\nmethod_options: {inner_steps: 1, test_inner_steps: 3}\n"
                    "backbone_options: {im2col: false}\n")
    config = load_config(path, ["method_options.test_inner_steps=10", "backbone_options.width=32"])
    assert config["method_options"] == {"inner_steps": 1, "test_inner_steps": 10}
    assert config["backbone_options"] == {"im2col": False, "width": 32}
    assert load_config(path, ["backbone_options={width: 32}"])["backbone_options"] == {"width": 32}  # a whole block


@pytest.mark.parametrize("name", ["3e-4", "1.5", ".inf", "true", "null", "007"])
def test_a_saved_config_reads_back_equal(name):
    """config.yaml is read back by the loader that reads 1e-3 as a float: a run named 3e-4 stays a string."""
    from fsl_jax.config import dump_config, read_yaml

    config = load_config(None, [f"name='{name}'", "method_options={distance: cosine}"])
    assert config["name"] == name and read_yaml(dump_config(config)) == config


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("overrides, message", [
    (["method=protonets"], "unknown method 'protonets'"),
    (["backbone=vgg"], "unknown backbone 'vgg'"),
    (["method_options={distance: cosine, temperature: 2}"], r"unknown option\(s\) \['temperature'\] for method 'protonet'"),
    (["backbone_options={depth: 3}"], r"unknown option\(s\) \['depth'\]"),
    # checked when the learner is built, before a run directory is written, not at the first step or evaluation
    (["method_options.task_map=vmapp"], r"task_map must be one of \('vmap', 'map', 'unroll'\), got 'vmapp'"),
    (["method=transfer", "method_options.head_steps=2.5"], "option head_steps of method 'transfer' must be an integer, got 2.5"),
    (["method=transfer", "method_options.head_steps=-3"], "head_steps must be a positive integer, got -3"),
    (["method=matching", "method_options.fce_steps=0"], "fce_steps must be a positive integer, got 0"),
    (["method=matching", "method_options.scale=0"], "scale must be a positive number, got 0"),
    (["method=matching", "method_options.full_context=1"], "option full_context of method 'matching' must be true or false"),
    (["method=protonet", "method_options.distance=2"], "option distance of method 'protonet' must be a string, got 2"),
    (["method=reptile", "method_options.adapted=head"], "Reptile adapts every parameter .* got adapted='head'"),
])
def test_unknown_methods_and_options_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_learner(load_config(None, overrides), num_train_classes=10)


def test_options_of_a_float_default_take_whole_numbers():
    make_learner(load_config(None, ["method=matching", "method_options.scale=10"]), num_train_classes=10)  # 10, not 10.0


def test_every_shipped_config_is_valid():
    configs = sorted(EXPERIMENTS.rglob("*.yaml"))
    assert configs
    for path in configs:
        config = load_config(path)
        if config["data"]["name"] == "omniglot":
            make_learner(config, num_train_classes=10)


def test_a_saved_config_missing_newer_keys_is_completed_with_defaults():
    from fsl_jax.config import complete

    full = load_config(None, ["episode.ways=5"])
    old = {k: v for k, v in full.items()}
    old["data"] = {k: v for k, v in full["data"].items() if k != "source"}  # saved before data.source existed
    assert complete(old) == full
    with pytest.raises(ConfigError, match="unknown config key 'data.colour'"):
        complete({**full, "data": {**full["data"], "colour": "red"}})


def test_segmentation_runs_saved_before_eval_threshold_get_their_tasks_threshold():
    """Runs of an older version have no eval.threshold: they evaluate at their task's, the published 0.3 for
    cluttered Omniglot, 0.5 for the others."""
    from fsl_jax.config import complete

    for name, threshold in (("cluttered_omniglot", 0.3), ("omniglot_seg", 0.5), ("fss", 0.5)):
        full = load_config(None, [f"data.name={name}"])
        assert full["eval"]["threshold"] == threshold
        old = {**full, "eval": {k: v for k, v in full["eval"].items() if k != "threshold"}}
        assert complete(old) == full


@pytest.mark.parametrize("override, message", [
    ("episode.ways=abc", "episode.ways must be an integer of at least 2, got 'abc'"),
    ("episode.ways=1", "episode.ways must be an integer of at least 2, got 1"),
    ("episode.shots=2.5", "episode.shots must be a positive integer, got 2.5"),
    ("data.image_size=0", "data.image_size must be a positive integer, got 0"),
    ("train.seed=-1", "train.seed must be a non-negative integer, got -1"),
    ("data.rotations=maybe", "data.rotations must be true or false, got 'maybe'"),
    ("optim.lr=true", "optim.lr must be a positive number, got True"),
    ("optim.clip_norm=-1", "optim.clip_norm must be a positive number, got -1"),
    ("optim.schedule=3", "optim.schedule must be a string, got 3"),
    ("data.test_alphabets=Latin", "data.test_alphabets must be a list, got 'Latin'"),
    ("data.test_alphabets=[Latin, 7]", r"data.test_alphabets\[1\] must be a string, got 7"),
    ("eval.settings=[[5, 1], [20]]", r"eval.settings\[1\] must be a \[ways, shots\] pair, got \[20\]"),
    ("eval.settings=[[5, 0]]", r"eval.settings\[0\] shots must be a positive integer, got 0"),
    ("name=7", "name must be a string, got 7"),
    ("method_options=[1]", "method_options must be a mapping"),
])
def test_values_of_the_wrong_type_or_range_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_task_keys_and_saved_configs_are_checked_too():
    from fsl_jax.config import complete

    with pytest.raises(ConfigError, match=r"data.distractors\[1\] must be a non-negative integer, got -2"):
        load_config(None, ["data.name=cluttered_omniglot", "data.distractors=[4, -2]"])
    with pytest.raises(ConfigError, match="data.test_classes must be a list, got 'cats'"):
        load_config(None, ["data.name=fss", "data.test_classes=cats"])
    good = load_config(None, ["data.name=cluttered_omniglot", "data.distractors=[0, 4]", "optim.lr=1",
                              "optim.clip_norm=2"])
    assert good["data"]["distractors"] == [0, 4] and good["optim"]["lr"] == 1
    with pytest.raises(ConfigError, match="episode.tasks must be a positive integer, got '8'"):
        complete({**good, "episode": {"tasks": "8"}})


@pytest.mark.parametrize("overrides, message", [
    (["eval.episodes=2"], r"eval.episodes is 2, fewer than the 3 levels of eval.distractors \[3, 31, 255\]"),
    (["eval.curve_episodes=1"], "eval.curve_episodes is 1, fewer than the 3 levels"),
    (["eval.distractors=[3, 3, 31]", "eval.curve_episodes=2"], "fewer than the 3 levels"),  # turns, not distinct levels
])
def test_evaluations_too_short_for_their_distractor_levels_are_refused(overrides, message):
    """The levels take turns over the episodes: fewer episodes than levels would drop the last levels silently."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.name=cluttered_omniglot", "method=siamese_unet", *overrides])
    load_config(None, ["data.name=cluttered_omniglot", "method=siamese_unet", "eval.curve_episodes=3"])


def test_a_run_config_that_is_no_longer_valid_names_its_file(tmp_path):
    from fsl_jax.config import dump_config, run_config
    from fsl_jax.errors import DataError

    with pytest.raises(DataError, match="is not a run directory: .*config.yaml is missing"):
        run_config(tmp_path)
    config = load_config(None, ["data.name=cluttered_omniglot", "method=siamese_unet"])
    (tmp_path / "config.yaml").write_text(dump_config({**config, "eval": {**config["eval"], "episodes": 2}}))
    with pytest.raises(ConfigError, match=f"{tmp_path / 'config.yaml'}: eval.episodes is 2"):
        run_config(tmp_path)
    (tmp_path / "config.yaml").write_text(dump_config(config))
    assert run_config(tmp_path, "/elsewhere")["data"]["dir"] == "/elsewhere"


@pytest.mark.parametrize("option, message", [
    ("widths=5", r"option widths of method 'siamese_unet' must be a list like \[16, 32, 64, 128\], got 5"),
    ("widths=[4, eight]", r"option widths\[1\] of method 'siamese_unet' must be an integer, got 'eight'"),
    ("threshold=0.4", r"option\(s\) \['threshold'\] of method 'siamese_unet' come from the config \(eval.threshold\)"),
    ("dice_weight=-1", "dice_weight must be a number of at least 0, got -1"),
    ("temperature=0", "temperature must be a positive number, got 0"),  # even with the contrastive term off
])
def test_segmenter_options_are_checked(option, message):
    config = load_config(None, ["data.name=cluttered_omniglot", "method=siamese_unet", f"method_options.{option}"])
    with pytest.raises(ConfigError, match=message):
        make_learner(config, num_train_classes=10)


def test_segmenters_take_their_training_metrics_threshold_from_eval_threshold(monkeypatch):
    """The training iou of curves.png is drawn beside the held-out one: both at the task's eval.threshold."""
    from fsl_jax import methods

    seen = {}
    monkeypatch.setitem(methods.METHODS, "siamese_unet", lambda threshold=0.5: seen.setdefault("threshold", threshold))
    for task, threshold in (("cluttered_omniglot", 0.3), ("fss", 0.5)):
        seen.clear()
        make_learner(load_config(None, [f"data.name={task}", "method=siamese_unet"]), num_train_classes=10)
        assert seen == {"threshold": threshold}
    seen.clear()
    make_learner(load_config(None, ["data.name=cluttered_omniglot", "method=siamese_unet", "eval.threshold=0.6"]), 10)
    assert seen == {"threshold": 0.6}


def test_fixed_cluttered_sets_default_to_the_published_levels():
    """4, 32 and 256 characters per scene, target included: the levels the evaluation scores by default."""
    from fsl_jax.cli import build_parser

    assert build_parser().parse_args(["data", "cluttered-sets"]).distractors == [3, 31, 255]
