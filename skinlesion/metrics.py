"""Classification metrics for the 7 HAM10000 classes: the keys of `metrics.json`.

Pure numpy on (true labels, predicted probabilities); scikit-learn is used only by
the tests, as an independent check of every figure. The keys are fixed by the
metrics.json contract (README): accuracy, balanced_accuracy, macro_f1, per_class,
confusion_matrix, roc_auc_macro, melanoma, ece, n_images. Every value is a plain int, float or
None (JSON `null`), so the dict can be written with `json.dumps` as it is.

Conventions where a figure is undefined (a class absent from `y_true` or never
predicted):
- per-class precision / recall / F1 with a zero denominator are 0.0 (scikit-learn's
  `zero_division=0`); such a class has `support` 0 or no predictions, visible
  in the same row.
- balanced accuracy is the mean recall over the classes present in `y_true`
  (scikit-learn's `balanced_accuracy_score`).
- macro F1 averages the classes present in `y_true` or predicted at least once
  (scikit-learn's `f1_score(average="macro")`): a class never seen and never
  predicted has no F1 to average; one predicted but absent counts as 0.
- `roc_auc_macro` averages the one-vs-rest AUC of the classes present in
  `y_true` (each needs positives and negatives); `None` when fewer than two
  classes are present.
- melanoma sensitivity at specificity 0.80 is `None` when `y_true` has no
  melanoma or nothing else.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from skinlesion.classes import CLASSES, INDEX, MELANOMA, NUM_CLASSES

MEL_SPECIFICITY = 0.80
MEL_KEY = "sensitivity_at_specificity_0.80"
_EPS = 1e-12  # tolerance on the specificity bound (0.8 is not exact in binary)

KEYS = (  # of metrics.json, in this order (the contract in the README)
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "per_class",
    "confusion_matrix",
    "roc_auc_macro",
    "melanoma",
    "ece",
    "n_images",
)
FILE_KEYS = (*KEYS, "intervals")  # metrics.json: compute_metrics' keys, then the evaluate
# stage's lesion-level bootstrap intervals (skinlesion.bootstrap.intervals)


def _check_inputs(y_true: Any, proba: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(proba, dtype=np.float64)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"y_true must be a non-empty 1-d array, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y_true must hold integer labels, got {y.dtype}")
    if p.shape != (y.size, NUM_CLASSES):
        raise ValueError(f"proba must have shape ({y.size}, {NUM_CLASSES}), got {p.shape}")
    if y.min() < 0 or y.max() >= NUM_CLASSES:
        raise ValueError(f"labels must be in [0, {NUM_CLASSES}), got {y.min()}..{y.max()}")
    if not np.all(np.isfinite(p)):
        raise ValueError("proba holds NaN or infinite values")
    return y.astype(np.int64), p


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """[7, 7] counts, rows = true class, columns = predicted, canonical order."""
    cm = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, 0 where den is 0."""
    out = np.zeros(num.shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x, ties sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Start index of each run of equal values.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], x.size]
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def binary_auc(positive: np.ndarray, score: np.ndarray) -> float | None:
    """ROC AUC by the rank statistic (Mann-Whitney U, ties counted as one half)."""
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(score)
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def sensitivity_at_specificity(
    positive: np.ndarray, score: np.ndarray, specificity: float
) -> float | None:
    """Best true-positive rate over thresholds whose specificity is >= `specificity`.

    Each distinct score is a threshold (positive when score >= threshold), plus
    "nothing positive" (sensitivity 0, specificity 1).
    """
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(-score, kind="mergesort")
    s, pos = score[order], positive[order]
    tp = np.cumsum(pos)
    fp = np.cumsum(~pos)
    last_of_tie = np.r_[s[1:] != s[:-1], True]  # a threshold takes every tied score
    tpr = np.r_[0.0, tp[last_of_tie] / n_pos]
    fpr = np.r_[0.0, fp[last_of_tie] / n_neg]
    ok = fpr <= (1.0 - specificity) + _EPS
    return float(tpr[ok].max())


def calibration_bins(
    y_true: np.ndarray, proba: np.ndarray, bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width confidence bin: (images, accuracy, mean confidence).

    Confidence = the largest probability of a row; bin k holds confidences in
    (k/bins, (k+1)/bins] (the first bin also holds 0). Empty bins hold zeros.
    """
    if bins < 1:
        raise ValueError(f"ece bins must be >= 1, got {bins}")
    p = np.asarray(proba, dtype=np.float64)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == np.asarray(y_true)).astype(np.float64)
    edges = np.arange(bins + 1) / bins  # k / bins: exactly rounded edges
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    counts = np.bincount(idx, minlength=bins)
    acc = _ratio(np.bincount(idx, weights=correct, minlength=bins), counts.astype(np.float64))
    mean_conf = _ratio(np.bincount(idx, weights=conf, minlength=bins), counts.astype(np.float64))
    return counts, acc, mean_conf


def expected_calibration_error(y_true: np.ndarray, proba: np.ndarray, bins: int) -> float:
    """Top-label ECE with `bins` equal-width confidence bins (see `calibration_bins`).

    ECE = sum over bins of (images in bin / all images) * |accuracy - mean confidence|.
    """
    counts, acc, mean_conf = calibration_bins(y_true, proba, bins)
    return float(np.sum(counts / counts.sum() * np.abs(acc - mean_conf)))


def compute_metrics(y_true: Any, proba: Any, ece_bins: int = 15) -> dict[str, Any]:
    """Every `metrics.json` figure from integer labels and [n, 7] class probabilities."""
    y, p = _check_inputs(y_true, proba)
    pred = p.argmax(axis=1)
    cm = confusion_matrix(y, pred)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = _ratio(tp, predicted.astype(np.float64))
    recall = _ratio(tp, support.astype(np.float64))
    f1 = _ratio(2 * precision * recall, precision + recall)

    present = support > 0
    seen = present | (predicted > 0)
    # With two or more classes present every present class has positives and negatives.
    aucs = [binary_auc(y == k, p[:, k]) for k in range(NUM_CLASSES) if present[k]]
    defined = [a for a in aucs if a is not None]
    mel = INDEX[MELANOMA]

    return {
        "accuracy": float(tp.sum() / y.size),
        "balanced_accuracy": float(recall[present].mean()),
        "macro_f1": float(f1[seen].mean()),
        "per_class": {
            name: {
                "precision": float(precision[k]),
                "recall": float(recall[k]),
                "f1": float(f1[k]),
                "support": int(support[k]),
            }
            for k, name in enumerate(CLASSES)
        },
        "confusion_matrix": [[int(v) for v in row] for row in cm],
        "roc_auc_macro": float(np.mean(defined)) if defined else None,
        "melanoma": {MEL_KEY: sensitivity_at_specificity(y == mel, p[:, mel], MEL_SPECIFICITY)},
        "ece": expected_calibration_error(y, p, ece_bins),
        "n_images": int(y.size),
    }


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The figures a log line, a manifest and the promotion decision quote."""
    return {
        "accuracy": metrics["accuracy"],
        "balanced_accuracy": metrics["balanced_accuracy"],
        "macro_f1": metrics["macro_f1"],
        "roc_auc_macro": metrics["roc_auc_macro"],
        "mel_sensitivity_at_spec_0.80": metrics["melanoma"][MEL_KEY],
        "mel_recall": metrics["per_class"][MELANOMA]["recall"],
        "ece": metrics["ece"],
        "n_images": metrics["n_images"],
    }
