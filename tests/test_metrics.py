"""Segmentation metrics against hand-computed values."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from fsl_jax import metrics

PRED = np.array([[1, 1, 0], [0, 1, 0]], bool)
TARGET = np.array([[1, 0, 0], [1, 1, 0]], bool)  # tp 2, fp 1, fn 1, tn 2


def test_confusion_counts_and_scores_by_hand():
    counts = metrics.confusion(PRED, TARGET)
    np.testing.assert_array_equal(counts, [2, 1, 1, 2])
    assert float(metrics.iou(counts)) == pytest.approx(2 / 4)
    assert float(metrics.background_iou(counts)) == pytest.approx(2 / 4)
    assert float(metrics.fb_iou(counts)) == pytest.approx(0.5)
    assert float(metrics.pixel_accuracy(counts)) == pytest.approx(4 / 6)
    assert float(metrics.precision(counts)) == pytest.approx(2 / 3)
    assert float(metrics.recall(counts)) == pytest.approx(2 / 3)
    assert float(metrics.f1(counts)) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))


def test_per_image_counts_over_axes():
    pred = np.stack([PRED, ~PRED])
    target = np.stack([TARGET, TARGET])
    counts = metrics.confusion(pred, target, axes=(1, 2))
    np.testing.assert_array_equal(counts, [[2, 1, 1, 2], [1, 2, 2, 1]])
    np.testing.assert_allclose(metrics.iou(counts), [2 / 4, 1 / 5])


def test_empty_cases_are_never_nan():
    empty = np.zeros((2, 2), bool)
    full = np.ones((2, 2), bool)
    both_empty = metrics.confusion(empty, empty)
    for score in (metrics.iou, metrics.precision, metrics.recall, metrics.f1, metrics.fb_iou, metrics.pixel_accuracy):
        assert float(score(both_empty)) == 1.0, score.__name__  # nothing to find, nothing found
    missed = metrics.confusion(empty, full)
    assert float(metrics.iou(missed)) == 0.0 and float(metrics.precision(missed)) == 0.0
    assert float(metrics.recall(missed)) == 0.0 and float(metrics.background_iou(missed)) == 0.0


def test_mean_iou_accumulates_per_class_before_averaging():
    counts = np.array([[1, 1, 0, 10], [3, 0, 1, 10], [1, 0, 3, 10]], np.float32)  # two episodes of class 0, one of 2
    classes = np.array([0, 0, 2])
    class_0, class_2 = 4 / (4 + 1 + 1), 1 / 4
    assert float(metrics.mean_iou(counts, classes, num_classes=3)) == pytest.approx((class_0 + class_2) / 2)
    per_episode = ((1 / 2 + 3 / 4) / 2 + class_2) / 2  # the other convention gives a different number
    assert abs(float(metrics.mean_iou(counts, classes, 3)) - per_episode) > 0.01


def test_summary_is_jittable_and_consistent():
    rng = np.random.default_rng(0)
    pred, target = rng.random((5, 8, 8)) > 0.5, rng.random((5, 8, 8)) > 0.6
    classes = np.array([0, 1, 1, 3, 0])
    counts = metrics.confusion(pred, target, axes=(1, 2))
    scores = jax.jit(metrics.summary, static_argnums=2)(counts, classes, 4)
    total = counts.sum(0)
    assert float(scores["fb_iou"]) == pytest.approx(float(metrics.fb_iou(total)))
    assert float(scores["pixel_accuracy"]) == pytest.approx(np.mean(pred == target))
    assert float(scores["mean_episode_iou"]) == pytest.approx(
        np.mean([(p & t).sum() / (p | t).sum() for p, t in zip(pred, target)]))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        metrics.confusion(np.zeros((2, 3)), np.zeros((3, 2)))
