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
