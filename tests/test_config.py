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


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("override, message", [
    ("method=protonets", "unknown method 'protonets'"),
    ("backbone=vgg", "unknown backbone 'vgg'"),
    ("method_options={distance: cosine, temperature: 2}", r"unknown option\(s\) \['temperature'\] for method 'protonet'"),
    ("backbone_options={depth: 3}", r"unknown option\(s\) \['depth'\]"),
])
def test_unknown_methods_and_options_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        make_learner(load_config(None, [override]), num_train_classes=10)


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
