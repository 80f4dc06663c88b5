"""The CLI says what it does: help texts give defaults and requirements, export prints no version noise."""
from __future__ import annotations

import importlib
import logging

import pytest

from fsl_jax.cli import main

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
