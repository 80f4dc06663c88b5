"""Experiment configs: YAML files over these defaults, with ``--set key.sub=value`` overrides.

An unknown key anywhere is an error that names it and lists the keys that exist, and a value of
the wrong type or range is an error that names its key (``check``); free-form option blocks
(``method_options``, ``backbone_options``) are checked against the signature of the method or
backbone they configure.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from fsl_jax.data.omniglot import DEFAULT_TEST_ALPHABETS, SMALL_BACKGROUND
from fsl_jax.errors import ConfigError, DataError, check_count, check_positive, check_probability

FREE_FORM = ("method_options", "backbone_options")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` as a string; a learning rate written that way must be a float."""


class _Dumper(yaml.SafeDumper):
    """Writes what :class:`_Loader` reads back: a string such as ``"3e-4"`` (a run name) quoted."""


for _yaml in (_Loader, _Dumper):
    _yaml.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$|^[-+]?(?:\d+\.\d*|\.\d+)$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
        list("-+0123456789."))


def dump_config(config: dict) -> str:
    """A config as YAML text that :func:`read_yaml` reads back equal, keys in their order."""
    return yaml.dump(config, Dumper=_Dumper, sort_keys=False)


def read_yaml(text: str, source: str = "YAML"):
    """YAML text read with floats such as ``1e-3`` kept floats; a syntax error is a ConfigError naming ``source``."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source} is not valid YAML: {err}") from err


def read_config_file(path: Path) -> dict:
    """A config file's mapping (an empty file is an empty mapping)."""
    config = read_yaml(Path(path).read_text(), f"config file {path}") or {}
    if not isinstance(config, dict):
        raise ConfigError(f"config file {path} must hold a mapping of config keys, got a {type(config).__name__}")
    return config

DEFAULTS: dict[str, Any] = {
    "name": None,  # run name; defaults to the config file's stem
    "out": None,  # run directory; defaults to runs/<name>
    "method": "protonet",
    "method_options": {},
    "backbone": "conv4",
    "backbone_options": {},
    "data": {
        "name": "omniglot",
        "source": "zips",  # zips: Lake's official zip files; tfds: tensorflow-datasets' "omniglot"
        "dir": None,  # else $FSL_JAX_DATA, else ../shared/data
        "image_size": 28,
        "rotations": True,  # 90-degree rotations of training characters as new classes
        "test_alphabets": list(DEFAULT_TEST_ALPHABETS),
        "zips": list(SMALL_BACKGROUND),  # the zips read: the two small background sets (not Lake's evaluation set)
    },
    "episode": {"ways": 20, "shots": 1, "queries": 15, "tasks": 1},
    "eval": {
        "ways": None,  # None: as in training
        "shots": None,
        "queries": 15,
        "episodes": 1000,  # final evaluation
        "every": 500,  # steps between the short evaluations drawn on the learning curves
        "curve_episodes": 100,
        "seed": 1234,
        "settings": None,  # [[ways, shots], ...] for the results table; None: the training shape
    },
    "optim": {
        "name": "adam",  # any optax optimiser taking a learning rate
        "lr": 1e-3,
        "schedule": "constant",  # constant | cosine | step
        "warmup_steps": 0,
        "decay_every": 2000,  # "step": lr halves this often (Snell et al.)
        "clip_norm": None,
    },
    "train": {
        "steps": 2000, "seed": 0, "log_every": 50, "checkpoint_every": 500, "keep_checkpoints": 2,
        # training steps per XLA execution (fsl_jax.train.make_train_steps): on CPU 10 saves about a
        # quarter of a MAML meta-step's time; 1 reproduces the README's tables step for step
        "steps_per_call": 1,
    },
}


# Segmentation tasks (see fsl_jax.tasks) replace the data, episode and eval blocks above with theirs.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "cluttered_omniglot": {  # one-shot segmentation in clutter (Michaelis et al. 2018)
        "data": {
            "name": "cluttered_omniglot",
            "dir": None,
            "test_alphabets": list(DEFAULT_TEST_ALPHABETS),
            "zips": list(SMALL_BACKGROUND),
            "scene_size": 96,
            "exemplar_size": 32,
            "char_size": 32,  # pixels a 105-pixel Omniglot character spans at scale 1
            "distractors": [4, 8, 16, 32, 64, 128, 256],  # training scenes: a level drawn per scene
        },
        "episode": {"tasks": 8},  # scenes (each with its exemplar) per training step
        "eval": {
            # the published levels of 4, 32 and 256 characters per scene, which count the target
            "distractors": [3, 31, 255],
            "episodes": 900,  # in all: the levels take turns
            "every": 500,
            "curve_episodes": 90,
            "seed": 1234,
            "pictures": 6,  # rows of the PNG that `fsl-jax eval` writes
            "threshold": 0.3,  # a pixel is foreground where p > this: the published protocol's (its calculate_IoU)
        },
    },
    "omniglot_seg": {  # K-shot segmentation episodes of Omniglot scenes
        "data": {
            "name": "omniglot_seg",
            "dir": None,
            "test_alphabets": list(DEFAULT_TEST_ALPHABETS),
            "zips": list(SMALL_BACKGROUND),
            "scene_size": 64,
            "char_size": 24,
            "distractors": [8],
        },
        "episode": {"shots": 1, "queries": 2, "tasks": 4},
        "eval": {"shots": None, "queries": 2, "episodes": 1000, "every": 500, "curve_episodes": 100, "seed": 1234,
                 "pictures": 6, "threshold": 0.5},  # threshold: a pixel is foreground where p > this
    },
    "fss": {  # K-shot segmentation episodes from a folder in the FSS-1000 layout
        "data": {
            "name": "fss",
            "dir": None,  # the folder of class folders; else <data root>/fss1000
            "image_size": 224,
            "resize": "stretch",  # or "pad": keep the aspect ratio (fsl_jax.data.fss)
            "test_classes": None,  # None: every fourth class in name order
        },
        "episode": {"shots": 1, "queries": 1, "tasks": 4},
        "eval": {"shots": None, "queries": 1, "episodes": 1000, "every": 500, "curve_episodes": 100, "seed": 1234,
                 "pictures": 6, "threshold": 0.5},
    },
}


def defaults_for(data_name: str) -> dict:
    """The defaults of a config whose ``data.name`` is ``data_name``."""
    config = copy.deepcopy(DEFAULTS)
    if data_name == DEFAULTS["data"]["name"]:
        return config
    if data_name not in TASK_DEFAULTS:
        raise ConfigError(f"unknown data.name {data_name!r}; available: {sorted([DEFAULTS['data']['name'], *TASK_DEFAULTS])}")
    config.update(copy.deepcopy(TASK_DEFAULTS[data_name]))
    return config


class _Options(dict):
    """Options of a free-form block set one by one (``--set method_options.scale=10``): merged into the
    block, where a whole mapping (``--set method_options={scale: 10}``, a config file's) replaces it."""


def _merge(base: dict, update: dict, path: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        where = f"{path}{key}"
        if key not in base:
            raise ConfigError(f"unknown config key {where!r}; valid keys here: {sorted(base)}")
        if isinstance(base[key], dict) and key not in FREE_FORM:
            if not isinstance(value, dict):
                raise ConfigError(f"config key {where!r} must be a mapping, got {value!r}")
            out[key] = _merge(base[key], value, where + ".")
        elif isinstance(value, _Options):
            out[key] = {**(base[key] if isinstance(base[key], dict) else {}), **copy.deepcopy(value)}
        else:
            out[key] = value
    return out


# Keys whose default is None take None or a value of this type; every other key takes its default's type.
OPTIONAL_TYPES = {"name": str, "out": str, "data.dir": str, "data.test_classes": list, "eval.ways": int,
                  "eval.shots": int, "eval.settings": list, "optim.clip_norm": float}
# The least value of an integer key (and of a list's integers); every other integer counts something, so is at least 1.
MINIMUM = {"train.seed": 0, "eval.seed": 0, "optim.warmup_steps": 0, "episode.ways": 2, "eval.ways": 2,
           "data.distractors": 0, "eval.distractors": 0}
# Keys that are probabilities: above 0 and below 1.
PROBABILITIES = ("eval.threshold",)
# The type of a list key's items, where its default is None or empty.
ITEM_TYPES = {"data.test_classes": str, "data.test_alphabets": str, "data.zips": str}
_KINDS = {bool: "true or false", str: "a string", list: "a list"}


def check_value(key: str, value, kind: type, least: int | None = None) -> None:
    """``value`` has the ``kind`` and range of ``key``, or a ConfigError names both."""
    if kind is int:
        check_count(key, value, MINIMUM.get(key.split("[")[0], 1) if least is None else least)
    if kind is float:
        (check_probability if key in PROBABILITIES else check_positive)(key, value)
    if kind in _KINDS and not isinstance(value, kind):
        raise ConfigError(f"{key} must be {_KINDS[kind]}, got {value!r}")
    if key == "eval.settings":
        for i, item in enumerate(value):
            if not (isinstance(item, list) and len(item) == 2):
                raise ConfigError(f"eval.settings[{i}] must be a [ways, shots] pair, got {item!r}")
            check_value(f"eval.settings[{i}] ways", item[0], int, least=MINIMUM["eval.ways"])
            check_value(f"eval.settings[{i}] shots", item[1], int)
    elif kind is list:
        for i, item in enumerate(value):
            check_value(f"{key}[{i}]", item, ITEM_TYPES.get(key, int))


def check(config: dict) -> dict:
    """``config``, after checking every value against the type and range of its key (see OPTIONAL_TYPES
    and MINIMUM), and the evaluations' episodes against their distractor levels; the first wrong one is
    a ConfigError that names its key."""

    def walk(defaults: dict, values: dict, path: str = "") -> None:
        for key, default in defaults.items():
            where, value = f"{path}{key}", values[key]
            if key in FREE_FORM:
                if not isinstance(value, dict):
                    raise ConfigError(f"{where} must be a mapping, got {value!r}")
            elif isinstance(default, dict):
                walk(default, value, where + ".")
            elif default is None:
                if value is not None:
                    check_value(where, value, OPTIONAL_TYPES[where])
            else:
                check_value(where, value, type(default))

    walk(defaults_for(config["data"]["name"]), config)
    levels = config["eval"].get("distractors")
    for key in ("episodes", "curve_episodes"):
        if levels and config["eval"][key] < len(levels):  # the levels take turns: the last ones would get none
            raise ConfigError(f"eval.{key} is {config['eval'][key]}, fewer than the {len(levels)} levels of "
                              f"eval.distractors {levels}: every level needs at least one episode")
    return config


def parse_override(item: str) -> dict:
    """``"a.b=3"`` -> ``{"a": {"b": 3}}`` with the value read as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value")
    key, raw = item.split("=", 1)
    value = read_yaml(raw, f"the value of override {item!r}")
    parts = key.strip().split(".")
    for depth in reversed(range(len(parts))):
        value = (_Options if depth == 1 and parts[0] in FREE_FORM else dict)({parts[depth]: value})
    return value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> dict:
    """Defaults, then the YAML file, then each ``key=value`` override, in that order.

    The defaults are those of the task named by the last ``data.name`` among the file and the
    overrides (classification on Omniglot if none).
    """
    layers = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        layers.append(read_config_file(path))
    layers += [parse_override(item) for item in overrides]
    data_name = DEFAULTS["data"]["name"]
    for layer in layers:
        if isinstance(layer, dict) and isinstance(layer.get("data"), dict) and "name" in layer["data"]:
            data_name = layer["data"]["name"]
    config = defaults_for(data_name)
    for i, layer in enumerate(layers):
        config = _merge(config, layer)
        if i == 0 and path is not None:
            config["name"] = config["name"] or path.stem
    check(config)
    config["name"] = config["name"] or "run"
    config["out"] = config["out"] or str(Path("runs") / config["name"])
    return config


def complete(config: dict) -> dict:
    """A full config saved earlier (a run's ``config.yaml``), with keys added to the defaults
    since then filled in, so runs of an older version still resume and evaluate."""
    return check(_merge(defaults_for(config.get("data", {}).get("name", DEFAULTS["data"]["name"])), config))


def run_config(run: str | Path, data_dir: str | None = None) -> dict:
    """The full config a run directory saved (its ``config.yaml``, completed as :func:`complete` does), with
    its data found in ``data_dir`` if given. A missing file is a DataError; a value that is no longer valid,
    a ConfigError naming the file, since no command line names it."""
    path = Path(run) / "config.yaml"
    if not path.is_file():
        raise DataError(f"{run} is not a run directory: {path} is missing")
    try:
        config = complete(read_config_file(path))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
    if data_dir:
        config["data"]["dir"] = str(data_dir)
    return config


def eval_episode(config: dict) -> dict:
    """The evaluation episode shape: the ``eval`` block with blanks filled from ``episode``."""
    e = config["eval"]
    return {"ways": e["ways"] or config["episode"]["ways"], "shots": e["shots"] or config["episode"]["shots"],
            "queries": e["queries"]}
