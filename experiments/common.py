"""What the table scripts share: the machine's description, the configs asked for and a trained run's summary."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import jax
import numpy as np

from fsl_jax.bench import cpu_name
from fsl_jax.config import load_config
from fsl_jax.train import Experiment, read_metrics, restore_params, train

ROOT = Path(__file__).resolve().parents[1]


def chosen_configs(parser, paths: list[Path], names: list[str]) -> list[Path]:
    """The config ``paths`` whose stems are ``names`` (all of them when none are named); an unknown
    name is a usage error (a typo would run nothing and rewrite the table)."""
    unknown = sorted(set(names) - {p.stem for p in paths})
    if unknown:
        parser.error(f"unknown config(s) {unknown}; known: {sorted(p.stem for p in paths)}")
    return [p for p in paths if p.stem in names] if names else paths


def machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores, jax {jax.__version__} on {jax.default_backend()}"


def commit() -> str:
    """The checked-out commit (7 hex digits) that a figure comes from, with ``+changes`` where tracked
    files other than the results and the README differ from it (the figures are then of no commit)."""
    git = lambda *args: subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!experiments/results", ":!README.md")
    return git("rev-parse", "--short=7", "HEAD").strip() + ("+changes" if changed else "")


def device(record: dict) -> str:
    """A table's device cell: the machine that trained a row, and the commit of the code that did."""
    return f"{record['machine']}; code at {record.get('commit', 'an unrecorded commit')}"


def train_run(path: Path, out: str, results: Path):
    """Train (or resume) the config at ``path`` into ``out``; returns (experiment, params, summary).

    The summary holds the config, steps, training minutes (the run's, over all its resumptions),
    median training and sampler episodes/s, and the machine and commit that trained it: for a run
    complete before this call, those its earlier record gives (else unrecorded), not today's.
    """
    config = load_config(path, [f"out={out}"])
    previous = json.loads(results.read_text()).get(path.stem, {}) if results.exists() else {}
    complete = any(r["step"] == config["train"]["steps"] for r in read_metrics(Path(out)))
    start = time.perf_counter()
    run = train(config, progress=False)
    records = [r for r in read_metrics(run) if r["split"] == "train"]
    if "elapsed_s" in records[-1]:
        minutes = records[-1]["elapsed_s"] / 60
    elif complete and "train_minutes" in previous:  # a run that logged no time, trained before: its minutes then
        minutes = previous["train_minutes"]
    else:
        minutes = (time.perf_counter() - start) / 60
    experiment = Experiment(config)
    params, step = restore_params(run, experiment)
    summary = {"config": str(path.relative_to(ROOT)), "method": config["method"], "steps": step,
               "train_episode": config["episode"], "train_minutes": round(minutes, 1),
               "train_episodes_per_s": round(float(np.median([r["episodes_per_s"] for r in records])), 2),
               "sampler_episodes_per_s": round(float(np.median([r["sampler_episodes_per_s"] for r in records])), 0),
               **({key: previous.get(key, "an unrecorded " + key) for key in ("machine", "commit")} if complete
                  else {"machine": machine(), "commit": commit()})}
    return experiment, params, summary
