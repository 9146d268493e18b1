"""Classification metrics in plain numpy (no torch, no sklearn), so they are easy to check by hand.

- single-label: top-1 and top-5 accuracy (top-5 only with more than 5 classes: with 5 or fewer it is 1 by
  definition and says nothing), mean per-class accuracy (mean over classes present in the targets),
  confusion matrix (rows = true class).
- multi-label: average precision per class as sklearn defines it (sum over score thresholds of
  (R_n - R_{n-1}) P_n, tied scores form one threshold), and mAP in the Charades convention: the mean over
  classes with at least one positive.
"""

from __future__ import annotations

import numpy as np

TOP_K = 5  # the second accuracy reported, when there are more classes than this


def top_k_accuracy(scores: np.ndarray, targets: np.ndarray, k: int = 1) -> float:
    """Share of rows whose target is among the k highest scores (ties broken by lower class id)."""
    scores, targets = np.asarray(scores), np.asarray(targets)
    k = min(k, scores.shape[1])
    # stable sort of -scores keeps the lower class id first among ties, as argmax does
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == targets[:, None], axis=1)))


def confusion_matrix(targets: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 [C, C], rows = true class, columns = predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(targets), np.asarray(predictions)), 1)
    return cm


def mean_class_accuracy(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean over the classes present in `targets` of the per-class recall of the top-1 prediction."""
    targets = np.asarray(targets)
    pred = np.argmax(scores, axis=1)
    classes = np.unique(targets)
    return float(np.mean([np.mean(pred[targets == c] == c) for c in classes]))


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """AP of one class; nan when it has no positive. Matches sklearn.metrics.average_precision_score."""
    scores, positives = np.asarray(scores, dtype=np.float64), np.asarray(positives) > 0
    total = positives.sum()
    if total == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], positives[order]
    tp = np.cumsum(y)
    # one threshold per distinct score: the last index of each run of tied scores
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp = tp[last]
    precision = tp / (last + 1)
    recall = tp / total
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def per_class_ap(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """float64 [C]; nan for classes without a positive."""
    return np.array([average_precision(scores[:, c], targets[:, c]) for c in range(scores.shape[1])])


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Charades convention: mean AP over the classes with at least one positive."""
    ap = per_class_ap(scores, targets)
    return float(np.nanmean(ap)) if np.any(~np.isnan(ap)) else float("nan")


def compute_metrics(scores: np.ndarray, targets: np.ndarray, multi_label: bool) -> dict[str, float]:
    """The headline numbers of one evaluation: top1, top5 (more than TOP_K classes only), mean_class_acc;
    or mAP."""
    if multi_label:
        return {"mAP": mean_average_precision(scores, targets)}
    out = {"top1": top_k_accuracy(scores, targets, 1)}
    if np.asarray(scores).shape[1] > TOP_K:
        out[f"top{TOP_K}"] = top_k_accuracy(scores, targets, TOP_K)
    out["mean_class_acc"] = mean_class_accuracy(scores, targets)
    return out


def primary_metric(multi_label: bool) -> str:
    return "mAP" if multi_label else "top1"
