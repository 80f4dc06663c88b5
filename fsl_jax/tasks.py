"""Kinds of few-shot task, keyed by a config's ``data.name``: what each gives the one training loop.

A loader turns a config into :class:`TaskData`: the seeded training sampler, a factory of
held-out samplers, the evaluation, and the held-out score drawn on learning curves.
:mod:`fsl_jax.train` and ``fsl-jax eval`` use nothing else, so classification and
segmentation share the loop, checkpoints, resumption and run directories.

- ``omniglot``: N-way K-shot classification episodes (accuracy).
- ``cluttered_omniglot``: one-shot segmentation in clutter (Michaelis et al. 2018), IoU per
  number of distractors (the paper's level N, counted in characters, is N - 1 distractors).
- ``omniglot_seg``: K-shot segmentation episodes of Omniglot scenes (mIoU, FB-IoU).
- ``fss``: K-shot segmentation episodes from a folder in the FSS-1000 layout (mIoU, FB-IoU).

Each kind's config blocks (``data``, ``episode``, ``eval``) are listed in :mod:`fsl_jax.config`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fsl_jax.config import check_value, eval_episode
from fsl_jax.data import EpisodeSampler, character_splits
from fsl_jax.errors import ConfigError
from fsl_jax.learner import Learner
from fsl_jax.meta.parallel import map_batches


@dataclasses.dataclass(frozen=True)
class TaskData:
    """What a config's task gives the training loop and ``fsl-jax eval``.

    eval_sampler(episodes_per_batch, **overrides) -> a held-out sampler; overrides are the
        episode settings ``fsl-jax eval`` may change (None: as configured).
    evaluate(learner, params, sampler, episodes, progress) -> dict of scores, ``score`` among them.
    describe(sampler) -> the fields that say what an evaluation measured, for its JSON line.
    picture(learner, params, sampler, path) -> path of a PNG of predictions, or None for none.
    """

    train_sampler: Any
    eval_sampler: Callable[..., Any]
    evaluate: Callable[..., dict]
    num_train_classes: int
    score: str
    describe: Callable[[Any], dict]
    picture: Callable[..., Path] | None = None


def _overrides(given: dict, allowed: tuple[str, ...], kind: str) -> dict:
    """The non-None overrides, refusing those that do not apply to this kind of task or are out of
    the range of their ``eval`` config key."""
    given = {k: v for k, v in given.items() if v is not None}
    refused = sorted(set(given) - set(allowed))
    if refused:
        raise ConfigError(f"{', '.join(refused)} cannot be set for {kind} episodes; settable: {list(allowed)}")
    for key, value in given.items():
        check_value(f"eval.{key}", value, list if isinstance(value, list) else int)
    return given


# Classification -------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _episode_accuracy(learner: Learner):
    """Jitted per-episode query accuracy, compiled once per learner."""
    return jax.jit(lambda p, b, r: jnp.mean(jnp.argmax(learner.predict(p, b, r), -1) == b.query_y, -1))


def evaluate(learner: Learner, params, sampler: EpisodeSampler, episodes: int, progress: bool = True) -> dict:
    """Accuracy over ``episodes`` episodes: mean and 95% confidence interval (1.96 standard errors)."""
    batches = map_batches(_episode_accuracy(learner), params, sampler, -(-episodes // sampler.tasks), progress)
    scores = np.concatenate(batches)[:episodes]
    return {**accuracy_ci95(scores), "episodes": len(scores)}


def accuracy_ci95(scores) -> dict:
    """Mean of per-episode accuracies and its 95% confidence interval (1.96 standard errors)."""
    scores = np.asarray(scores, dtype=np.float64)
    ci95 = 1.96 * scores.std(ddof=1) / math.sqrt(len(scores)) if len(scores) > 1 else float("nan")
    return {"accuracy": float(scores.mean()), "ci95": float(ci95)}


def lake_run_accuracies(learner: Learner, params, runs) -> list[float]:
    """Accuracy on each of Lake's one-shot runs (single-task episodes from :func:`read_runs`)."""
    accuracy = _episode_accuracy(learner)
    return [float(accuracy(params, run, jax.random.PRNGKey(0))[0]) for run in runs]


def classification(config: dict) -> TaskData:
    train_chars, test_chars = character_splits(config)
    ep, seed = config["episode"], config["train"]["seed"]

    def eval_sampler(episodes_per_batch: int = 10, **overrides) -> EpisodeSampler:
        shape = {**eval_episode(config), **_overrides(overrides, ("ways", "shots", "queries"), "classification")}
        return EpisodeSampler(test_chars, shape["ways"], shape["shots"], shape["queries"], episodes_per_batch,
                              config["eval"]["seed"])

    return TaskData(
        train_sampler=EpisodeSampler(train_chars, ep["ways"], ep["shots"], ep["queries"], ep["tasks"], seed),
        eval_sampler=eval_sampler, evaluate=evaluate, num_train_classes=train_chars.num_classes, score="accuracy",
        describe=lambda s: {"ways": s.ways, "shots": s.shots, "queries": s.queries,
                            "alphabets": config["data"]["test_alphabets"]})


# Segmentation ---------------------------------------------------------------------------------

def _segmentation(config: dict, train_sampler, make_eval, num_train: int, allowed, describe) -> TaskData:
    """TaskData of a segmentation source, scored at the probability threshold ``eval.threshold``."""
    from fsl_jax.seg.evaluation import evaluate_segmentation, write_grid

    threshold = config["eval"]["threshold"]

    def evaluate_(learner, params, sampler, episodes, progress=True):
        return evaluate_segmentation(learner, params, sampler, episodes, threshold, progress)

    def picture(learner, params, sampler, path):
        return write_grid(learner, params, sampler, path, threshold, rows=config["eval"]["pictures"])

    return TaskData(
        train_sampler=train_sampler,
        eval_sampler=lambda episodes_per_batch=10, **overrides: make_eval(
            episodes_per_batch, **_overrides(overrides, allowed, config["data"]["name"])),
        evaluate=evaluate_, num_train_classes=num_train, score="iou", describe=describe, picture=picture)


def _omniglot_105(config: dict):
    from fsl_jax.data.omniglot import load_omniglot, split

    data = config["data"]
    return split(load_omniglot(data["dir"], 105, data["zips"]), data["test_alphabets"])


def cluttered_omniglot(config: dict) -> TaskData:
    from fsl_jax.data.cluttered import TEST_DRAWERS, TRAIN_DRAWERS, ClutteredOmniglot

    data, ep, ev = config["data"], config["episode"], config["eval"]
    train, test = _omniglot_105(config)
    shape = {k: data[k] for k in ("scene_size", "exemplar_size", "char_size")}

    def make_eval(tasks, distractors=None):
        return ClutteredOmniglot(test, distractors or ev["distractors"], tasks, ev["seed"], TEST_DRAWERS,
                                 balanced=True, **shape)

    return _segmentation(
        config, ClutteredOmniglot(train, data["distractors"], ep["tasks"], config["train"]["seed"], TRAIN_DRAWERS,
                                  **shape),
        make_eval, train.num_classes, ("distractors",),
        describe=lambda s: {"protocol": "cluttered-omniglot", "distractors": list(s.distractors),
                            "alphabets": data["test_alphabets"], "drawers": list(TEST_DRAWERS)})


def omniglot_seg(config: dict) -> TaskData:
    from fsl_jax.data.cluttered import TEST_DRAWERS, TRAIN_DRAWERS, OmniglotSceneEpisodes

    data, ep, ev = config["data"], config["episode"], config["eval"]
    train, test = _omniglot_105(config)
    shape = {k: data[k] for k in ("scene_size", "char_size", "distractors")}

    def make_eval(tasks, shots=None, queries=None):
        return OmniglotSceneEpisodes(test, shots or ev["shots"] or ep["shots"], queries or ev["queries"], tasks,
                                     ev["seed"], TEST_DRAWERS, **shape)

    return _segmentation(
        config, OmniglotSceneEpisodes(train, ep["shots"], ep["queries"], ep["tasks"], config["train"]["seed"],
                                      TRAIN_DRAWERS, **shape),
        make_eval, train.num_classes, ("shots", "queries"),
        describe=lambda s: {"protocol": "omniglot-scenes", "shots": s.shots, "queries": s.queries,
                            "distractors": list(s.distractors), "alphabets": data["test_alphabets"]})


def fss(config: dict) -> TaskData:
    from fsl_jax.data.fss import SegmentationEpisodes, load_fss, split_classes
    from fsl_jax.data.omniglot import data_root

    data, ep, ev = config["data"], config["episode"], config["eval"]
    root = Path(data["dir"]) if data["dir"] else data_root(None) / "fss1000"
    train, test = split_classes(load_fss(root, data["image_size"], data["resize"]), data["test_classes"])

    def make_eval(tasks, shots=None, queries=None):
        return SegmentationEpisodes(test, shots or ev["shots"] or ep["shots"], queries or ev["queries"], tasks, ev["seed"])

    return _segmentation(
        config, SegmentationEpisodes(train, ep["shots"], ep["queries"], ep["tasks"], config["train"]["seed"]),
        make_eval, len(train.classes), ("shots", "queries"),
        describe=lambda s: {"protocol": "fss", "shots": s.shots, "queries": s.queries, "classes": len(test.classes)})


TASKS: dict[str, Callable[[dict], TaskData]] = {
    "omniglot": classification,
    "cluttered_omniglot": cluttered_omniglot,
    "omniglot_seg": omniglot_seg,
    "fss": fss,
}


def load_task(config: dict) -> TaskData:
    """The task a config's ``data.name`` names."""
    name = config["data"]["name"]
    if name not in TASKS:
        raise ConfigError(f"unknown data.name {name!r}; available: {sorted(TASKS)}")
    return TASKS[name](config)
