"""Evaluation of segmenters over seeded episodes, and the picture a user looks at.

Scores follow :mod:`fsl_jax.metrics`: per-episode foreground IoU averaged over episodes (the
clutter benchmark's figure, Michaelis et al. 2018, reported per distractor level with a 95%
confidence interval), and mIoU, FB-IoU, pixel accuracy, precision, recall and F1 accumulated
over all episodes (mIoU per class first, the few-shot convention of Shaban et al. 2017). A pixel
is predicted foreground where its probability exceeds the evaluation's ``threshold`` (the
clutter benchmark's code keeps p > 0.3; 0.5 is the usual choice elsewhere).
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fsl_jax import metrics
from fsl_jax.learner import Learner
from fsl_jax.meta.parallel import map_batches
from fsl_jax.seg.common import logit


@functools.lru_cache(maxsize=None)
def _episode_counts(learner: Learner, threshold: float):
    """Jitted (predicted masks [T, Q, H, W], confusion counts per task [T, 4]), compiled once per learner
    and threshold: a pixel is foreground where its logit exceeds log(t / (1 - t)), i.e. p > t."""
    cut = logit(threshold)

    def counts(params, batch, rng):
        pred = learner.predict(params, batch, rng) > cut
        return pred, metrics.confusion(pred, batch.query_mask > 0.5, axes=(1, 2, 3))

    return jax.jit(counts)


@functools.lru_cache(maxsize=None)
def _episode_scores(learner: Learner, threshold: float):
    """(confusion counts per task [T, 4], classes [T], distractors [T]) of a batch, one function per
    learner and threshold (:func:`fsl_jax.meta.map_batches` keeps its program)."""
    compute = _episode_counts(learner, threshold)
    return lambda params, batch, rng: (compute(params, batch, rng)[1], batch.classes, batch.distractors)


def _mean_ci(values: np.ndarray) -> tuple[float, float]:
    ci = 1.96 * values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return float(values.mean()), float(ci)


def evaluate_segmentation(learner: Learner, params, sampler, episodes: int, threshold: float,
                          progress: bool = True) -> dict:
    """Scores of ``learner`` over the first ``episodes`` tasks of ``sampler`` (batches 0, 1, ...), a
    pixel predicted foreground where its probability exceeds ``threshold``.

    mIoU averages over the class ids the episodes hold, whatever their source (a fixed set may
    come from other classes than the run's held-out ones).

    Returns ``iou`` (mean per-episode foreground IoU, all query images of an episode together)
    and its ``ci95``, ``miou``, ``fb_iou``, ``pixel_accuracy``, ``precision``, ``recall``, ``f1``,
    ``episodes``, ``threshold``; and where scenes hold distractors, ``iou_by_distractors`` and
    ``ci95_by_distractors`` keyed by the number of distractors.
    """
    batches = map_batches(_episode_scores(learner, threshold), params, sampler, -(-episodes // sampler.tasks), progress)
    counts, classes, levels = (np.concatenate(parts)[:episodes] for parts in zip(*batches))
    scores = metrics.summary(jnp.asarray(counts), jnp.asarray(classes), int(classes.max()) + 1)
    scores = {k: float(v) for k, v in scores.items()}
    per_episode = np.asarray(metrics.iou(jnp.asarray(counts)))
    iou, ci95 = _mean_ci(per_episode)
    result = {"iou": iou, "ci95": ci95, **{k: v for k, v in scores.items() if k != "mean_episode_iou"},
              "episodes": int(len(counts)), "threshold": threshold}
    if levels.max() > 0:
        by_level = {int(d): _mean_ci(per_episode[levels == d]) for d in np.unique(levels)}
        result["iou_by_distractors"] = {str(d): m for d, (m, _) in by_level.items()}
        result["ci95_by_distractors"] = {str(d): c for d, (_, c) in by_level.items()}
    return result


def _overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with its mask tinted red."""
    tint = np.zeros_like(image)
    tint[..., 0] = 1.0
    return np.where(mask[..., None] > 0.5, 0.45 * image + 0.55 * tint, image)


def write_grid(learner: Learner, params, sampler, path: str | Path, threshold: float, rows: int = 6) -> Path:
    """A PNG grid of the first ``rows`` tasks of ``sampler``: support (first shot, its mask in red),
    query (first), prediction (probability above ``threshold``), ground truth; each row titled with
    its IoU (and distractors)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches, index = [], 0
    while sum(b[0].tasks for b in batches) < rows:
        batch = sampler.sample(index)
        pred, counts = _episode_counts(learner, threshold)(params, batch, jax.random.PRNGKey(index))
        batches.append((batch, np.asarray(pred), np.asarray(metrics.iou(counts))))
        index += 1
    fig, axes = plt.subplots(rows, 4, figsize=(8, 2.1 * rows), squeeze=False)
    row = 0
    for batch, pred, iou in batches:
        for t in range(batch.tasks):
            if row == rows:
                break
            panels = [(_overlay(batch.support_x[t, 0], batch.support_mask[t, 0]), "support + mask"),
                      (batch.query_x[t, 0], "query"), (pred[t, 0], "prediction"), (batch.query_mask[t, 0], "ground truth")]
            for ax, (image, title) in zip(axes[row], panels):
                ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(title, fontsize=9)
            label = f"IoU {iou[t]:.2f}" + (f"\n{batch.distractors[t]} distractors" if batch.distractors[t] else "")
            axes[row, 0].set_ylabel(label, fontsize=8)
            row += 1
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
