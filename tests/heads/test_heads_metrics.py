"""Metrics against sklearn (the reference) on random inputs, ties included."""

import numpy as np
import pytest
from sklearn import metrics as skm

from cmdcl_heads.metrics import (average_precision, compute_metrics, confusion_matrix, mean_average_precision,
                                 mean_class_accuracy, per_class_ap, top_k_accuracy)


@pytest.mark.parametrize("seed", range(5))
def test_single_label_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n, c = 200, 12
    scores = rng.standard_normal((n, c))
    targets = rng.integers(0, c, n)
    targets[:20] = scores[:20].argmax(1)  # some correct ones
    assert top_k_accuracy(scores, targets, 1) == pytest.approx(skm.accuracy_score(targets, scores.argmax(1)))
    assert top_k_accuracy(scores, targets, 5) == pytest.approx(
        skm.top_k_accuracy_score(targets, scores, k=5, labels=np.arange(c)))
    assert mean_class_accuracy(scores, targets) == pytest.approx(
        skm.balanced_accuracy_score(targets, scores.argmax(1)))
    np.testing.assert_array_equal(confusion_matrix(targets, scores.argmax(1), c),
                                  skm.confusion_matrix(targets, scores.argmax(1), labels=np.arange(c)))


@pytest.mark.parametrize("seed", range(5))
def test_average_precision_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n, c = 150, 9
    scores = np.round(rng.standard_normal((n, c)), 1)  # rounding makes many ties
    targets = (rng.random((n, c)) < 0.2).astype(np.float32)
    targets[:, 3] = 0  # a class without positives: left out of mAP (Charades convention)
    ap = per_class_ap(scores, targets)
    assert np.isnan(ap[3])
    for k in range(c):
        if k != 3:
            assert ap[k] == pytest.approx(skm.average_precision_score(targets[:, k], scores[:, k]), abs=1e-12)
    keep = [k for k in range(c) if k != 3]
    expected = skm.average_precision_score(targets[:, keep], scores[:, keep], average="macro")
    assert mean_average_precision(scores, targets) == pytest.approx(expected, abs=1e-12)
    assert compute_metrics(scores, targets, multi_label=True)["mAP"] == pytest.approx(expected, abs=1e-12)


def test_perfect_and_worst_rankings():
    y = np.array([1, 1, 0, 0])
    assert average_precision(np.array([4, 3, 2, 1]), y) == 1.0
    assert average_precision(np.array([1, 2, 3, 4]), y) == pytest.approx((1 / 3 + 2 / 4) / 2)
    scores = np.eye(3)[[0, 1, 2, 0]]
    assert compute_metrics(scores, np.array([0, 1, 2, 1]), multi_label=False)["top1"] == 0.75


@pytest.mark.parametrize("classes", [2, 3, 5, 6, 12])
def test_top5_is_reported_only_with_more_than_5_classes(classes):
    rng = np.random.default_rng(classes)
    scores, targets = rng.standard_normal((40, classes)), rng.integers(0, classes, 40)
    out = compute_metrics(scores, targets, multi_label=False)
    assert ("top5" in out) == (classes > 5)
    assert list(out)[0] == "top1" and list(out)[-1] == "mean_class_acc"
    if classes > 5:
        assert out["top5"] == pytest.approx(skm.top_k_accuracy_score(targets, scores, k=5, labels=np.arange(classes)))
