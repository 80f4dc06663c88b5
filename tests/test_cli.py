"""The CLI end to end: train, eval and their errors, Ctrl-C and SIGTERM; help texts give defaults and
requirements; export prints no version noise."""
from __future__ import annotations

import importlib
import json
import logging
import os

import jax
import numpy as np
import pytest
import yaml

from fsl_jax.cli import main
from fsl_jax.config import load_config
from fsl_jax.train import Experiment, restore_params, train

from tiny import TINY, tiny_config

FSS_DATA_DIR = ("for data.name fss, the folder of class folders itself (a root holds it as fss1000/); "
                "for data.source tfds, tensorflow-datasets' data folder (else tfds's default)")


@pytest.mark.parametrize("command, expected", [
    (["data", "download"], ["--data-dir DATA_DIR required: the zips go to DATA_DIR/omniglot"]),
    (["bench", "maml"], ["--steps STEPS timed calls after compilation (default 10, at least 5)"]),
    (["bench", "train"], ["--steps STEPS timed calls after compilation (default 10, at least 1)", FSS_DATA_DIR]),
    (["eval"], ["--ways WAYS classes per episode (default: the run's eval.ways, else its training ways)",
                "--shots SHOTS support examples per class (default: the run's eval.shots, else its training shots)",
                "--queries QUERIES query examples per class (default: the run's eval.queries)",
                "--episodes EPISODES episodes to score, at least one per distractor level (default: the run's "
                "eval.episodes; with --episodes-dir, the whole set)", FSS_DATA_DIR]),
    (["train"], [FSS_DATA_DIR]),
    (["export"], [FSS_DATA_DIR]),
])
def test_help_gives_defaults_and_requirements(command, expected, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps to the terminal's width, at hyphens too
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for line in expected:
        assert line in text


def test_data_download_requires_its_data_dir(monkeypatch, capsys):
    """As its help says: $FSL_JAX_DATA does not stand in for --data-dir (nothing is written there unasked)."""
    monkeypatch.setenv("FSL_JAX_DATA", "/nonexistent")
    assert main(["data", "download"]) == 2
    assert "data download needs --data-dir" in capsys.readouterr().err


def test_export_hides_only_coremltools_version_warnings(caplog):
    """coremltools warns at import that the pinned TensorFlow and Torch are newer than it has tested;
    `fsl-jax export` drops those lines and keeps every other message of coremltools."""
    importlib.import_module("bridges.cli")  # installs the filter, as `fsl-jax` does when it builds its parser

    with caplog.at_level(logging.WARNING):
        logging.getLogger("coremltools").warning("TensorFlow version 2.21.0 has not been tested with coremltools. "
                                                 "You may run into unexpected errors.")
        logging.getLogger("coremltools").warning("Failed to load _MLModelProxy")
    assert [r.getMessage() for r in caplog.records] == ["Failed to load _MLModelProxy"]


def _cli_train(tmp_path):
    """A protonet config file and the `fsl-jax train` arguments that train it, TINY, into tmp_path/run."""
    config = tmp_path / "c.yaml"
    config.write_text("method: protonet\n")
    args = ["train", "--config", str(config), "--no-progress", "--set", f"out={tmp_path / 'run'}"]
    for item in TINY:
        args += ["--set", item]
    return config, args


def _at_call(monkeypatch, number, happen):
    """Have ``happen()`` run as training calls its compiled steps for the ``number``-th time."""
    import fsl_jax.train as train_module

    make_train_steps = train_module.make_train_steps

    def patched(*args):
        steps, calls = make_train_steps(*args), []

        def call(*inputs):
            calls.append(1)
            if len(calls) == number:
                happen()
            return steps(*inputs)
        return call

    monkeypatch.setattr(train_module, "make_train_steps", patched)


def test_ctrl_c_says_where_the_run_resumes(tmp_path, monkeypatch, capsys):
    """Ctrl-C in `fsl-jax train` prints one line naming the checkpoint the run resumes from, and exits 130."""
    def ctrl_c():
        raise KeyboardInterrupt

    _at_call(monkeypatch, 5, ctrl_c)
    config, args = _cli_train(tmp_path)
    try:
        assert main(args) == 130
    except KeyboardInterrupt:  # escaping, it would stop the test session
        pytest.fail("Ctrl-C ended `fsl-jax train` in a traceback")
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "fsl-jax: interrupted; the run resumes from its last checkpoint (step 3) with the same command")


def test_sigterm_writes_a_checkpoint_of_the_step_reached_and_stops(tmp_path, monkeypatch, capsys):
    """A preemption notice (SIGTERM, from a cluster scheduler) during step 4 of `fsl-jax train`:
    it writes the checkpoint of step 4 (not only the periodic one of step 3), says so, exits 143,
    and gives SIGTERM its handler back; the run then resumes from step 4 to the uninterrupted result."""
    import signal

    _at_call(monkeypatch, 4, lambda: os.kill(os.getpid(), signal.SIGTERM))
    before = signal.getsignal(signal.SIGTERM)
    config, args = _cli_train(tmp_path)
    assert main(args) == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "fsl-jax: preempted (SIGTERM) at step 4: its checkpoint is written, and the same command resumes the run from it")
    assert signal.getsignal(signal.SIGTERM) is before
    same = lambda out: load_config(config, TINY + [f"out={tmp_path / out}"])
    experiment = Experiment(same("run"))
    assert restore_params(tmp_path / "run", experiment)[1] == 4
    monkeypatch.undo()
    resumed, _ = restore_params(train(same("run"), progress=False), experiment)
    whole, _ = restore_params(train(same("whole"), progress=False), experiment)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(whole)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_cli_train_then_eval_prints_json(tmp_path, capsys):
    config, args = _cli_train(tmp_path)
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["run"] == str(tmp_path / "run")
    assert main(["eval", "--run", str(tmp_path / "run"), "--ways", "3", "--shots", "2", "--episodes", "12", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["ways"] == 3 and result["shots"] == 2 and result["episodes"] == 12
    assert 0.0 <= result["accuracy"] <= 1.0 and result["ci95"] > 0
    assert main(["eval", "--run", str(tmp_path / "run"), "--episodes", "1", "--no-progress"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(line, parse_constant=pytest.fail)["ci95"] is None  # strict JSON: no NaN for one episode

    main(["data", "lake-runs", "--out", str(tmp_path / "lake"), "--runs", "3"])
    assert main(["data", "lake-runs", "--out", str(tmp_path / "lake"), "--runs", "2"]) == 1
    assert "lake already exists; pass --force to replace it" in capsys.readouterr().err
    assert main(["data", "lake-runs", "--out", str(tmp_path / "lake"), "--runs", "2", "--force"]) == 0
    assert sorted(p.name for p in (tmp_path / "lake").iterdir()) == ["run01", "run02"]  # replaced, not mixed
    capsys.readouterr()
    assert main(["eval", "--run", str(tmp_path / "run"), "--lake-runs", str(tmp_path / "lake")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["runs"] == 2 and result["protocol"] == "lake-one-shot"
    assert result["error"] == pytest.approx(1 - result["accuracy"])

    run = str(tmp_path / "run")
    for args, message in [(["--episodes", "0"], "--episodes must be at least 1, got 0"),
                          (["--ways", "1"], "eval.ways must be an integer of at least 2, got 1"),
                          (["--queries", "0"], "eval.queries must be a positive integer, got 0"),
                          (["--lake-runs", str(tmp_path / "lake"), "--ways", "5", "--episodes", "7"],
                           "--ways, --episodes shape sampled episodes; --lake-runs evaluates a fixed set"),
                          (["--episodes-dir", str(tmp_path / "lake")], "--episodes-dir evaluates segmenters"),
                          (["--picture", str(tmp_path / "p.png")], "--picture draws segmentations")]:
        assert main(["eval", "--run", run, *args]) == 1
        assert message in capsys.readouterr().err
    (tmp_path / "a_file").write_text("kept")
    assert main(["train", "--config", str(config), "--set", f"out={tmp_path / 'a_file' / 'run'}"]) == 1
    assert "a_file/run" in capsys.readouterr().err  # an OSError, named by its path: no traceback
    for flags in (["data", "lake-runs", "--episodes", "3"], ["bench", "train", "--config", str(config), "--tasks", "9"],
                  ["bench", "maml", "--config", str(config)]):
        with pytest.raises(SystemExit):  # a flag of another command is refused, not ignored
            main(flags)
    assert main(["data", "lake-runs", "--seed", "-1"]) == 1
    assert "--seed must be at least 0, got -1" in capsys.readouterr().err


def test_eval_refuses_fewer_episodes_than_distractor_levels(tmp_path, monkeypatch, capsys):
    """Cluttered scenes give the levels in turn: fewer episodes than levels would leave some out of the
    scores without a word. The check needs no trained parameters, so none are restored."""
    import fsl_jax.train

    run = tmp_path / "run"
    run.mkdir()
    config = load_config(None, ["method=siamese_unet", "method_options={widths: [4, 8]}", "data.name=cluttered_omniglot",
                                "data.scene_size=32", "data.exemplar_size=16", "data.char_size=12",
                                "data.distractors=[2]", "eval.distractors=[1, 3, 5]", f"out={run}"])
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setattr(fsl_jax.train, "restore_params", lambda run, experiment: (None, 0))
    for args, message in [(["--episodes", "2"], "--episodes 2 is fewer than the 3 distractor levels [1, 3, 5]"),
                          (["--episodes", "1", "--distractors", "2", "4"],
                           "--episodes 1 is fewer than the 2 distractor levels [2, 4]")]:
        assert main(["eval", "--run", str(run), "--no-progress", *args]) == 1
        assert message in capsys.readouterr().err


def test_yaml_errors_name_their_source(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("method: [protonet\n")
    assert main(["train", "--config", str(config)]) == 1
    assert f"config file {config} is not valid YAML" in capsys.readouterr().err
    config.write_text("- protonet\n")
    assert main(["train", "--config", str(config)]) == 1
    assert "must hold a mapping of config keys, got a list" in capsys.readouterr().err
    config.write_text("method: protonet\n")
    assert main(["train", "--config", str(config), "--set", "train.steps=[4"]) == 1
    assert "the value of override 'train.steps=[4' is not valid YAML" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["eval", "--run", "/nonexistent/run"], "not a run directory"),
    (["train", "--config", "/nonexistent.yaml"], "nonexistent.yaml"),
])
def test_cli_errors_are_one_clear_line(args, message, capsys):
    assert main(args) == 1
    assert message in capsys.readouterr().err


def test_bench_train_needs_a_timed_step(capsys):
    assert main(["bench", "train", "--config", "experiments/demo/protonet.yaml", "--steps", "0"]) == 1
    assert "--steps must be at least 1, got 0" in capsys.readouterr().err


def test_cli_unknown_method_is_named(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("method: maml2\n")
    assert main(["train", "--config", str(config), "--set", f"out={tmp_path}/r"]) == 1
    assert "unknown method 'maml2'" in capsys.readouterr().err


def test_eval_without_checkpoint_is_clear(tmp_path, capsys):
    run = tmp_path / "empty"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(tiny_config(tmp_path, name="empty")))
    assert main(["eval", "--run", str(run)]) == 1
    assert "has no checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]  # nothing created by looking
