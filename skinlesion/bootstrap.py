"""95% bootstrap intervals that resample lesions, not images.

HAM10000 holds several images of one lesion; they are not independent draws, so a
resample takes whole lesions (every image of a drawn lesion, as often as it is drawn).
`intervals` gives percentile intervals for balanced accuracy, macro AUC and each class's
recall; `paired_gain` resamples the same lesions for two models scored on the same
images, so the interval of their difference is not widened by the data's own noise.
Pure numpy and deterministic for a given seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from skinlesion.classes import CLASSES, NUM_CLASSES
from skinlesion.metrics import binary_auc

LEVEL = 0.95
DRAWS = 1000
FEW_IMAGES = 30  # below this many validation images a class's recall interval is flagged

Score = Callable[[np.ndarray, np.ndarray], float | None]  # (labels, proba) -> figure


def _recall(y: np.ndarray, pred: np.ndarray, k: int) -> float | None:
    mine = y == k
    return float((pred[mine] == k).mean()) if mine.any() else None


def balanced_accuracy(y: np.ndarray, proba: np.ndarray) -> float | None:
    pred = proba.argmax(axis=1)
    recalls = [r for k in range(NUM_CLASSES) if (r := _recall(y, pred, k)) is not None]
    return float(np.mean(recalls)) if recalls else None


def roc_auc_macro(y: np.ndarray, proba: np.ndarray) -> float | None:
    if np.unique(y).size < 2:
        return None
    aucs = [binary_auc(y == k, proba[:, k]) for k in range(NUM_CLASSES) if (y == k).any()]
    defined = [a for a in aucs if a is not None]
    return float(np.mean(defined)) if defined else None


def macro_f1(y: np.ndarray, proba: np.ndarray) -> float | None:
    """Over the classes present or predicted (the convention of metrics.compute_metrics)."""
    pred = proba.argmax(axis=1)
    f1s = []
    for k in range(NUM_CLASSES):
        tp = float(np.sum((pred == k) & (y == k)))
        true, said = float(np.sum(y == k)), float(np.sum(pred == k))
        if true or said:
            f1s.append(2 * tp / (true + said))
    return float(np.mean(f1s)) if f1s else None


SCORES: dict[str, Score] = {  # the figures a promotion may be decided on
    "balanced_accuracy": balanced_accuracy,
    "macro_f1": macro_f1,
    "roc_auc_macro": roc_auc_macro,
}


def _resamples(lesions: Sequence[str], draws: int, seed: int) -> list[np.ndarray]:
    """Image indices of each resample: lesions drawn with replacement, all their images."""
    _, inverse = np.unique(np.asarray(lesions, dtype=str), return_inverse=True)
    n = int(inverse.max()) + 1
    rng = np.random.default_rng(seed)
    images = np.arange(inverse.size)
    return [
        np.repeat(images, np.bincount(rng.integers(0, n, n), minlength=n)[inverse])
        for _ in range(draws)
    ]


def _bounds(values: list[float | None], level: float) -> list[float] | None:
    got = np.array([v for v in values if v is not None], dtype=np.float64)
    if got.size == 0:
        return None
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(got, [tail, 100.0 - tail])
    return [float(lo), float(hi)]


def intervals(
    y_true: Any,
    proba: Any,
    lesions: Sequence[str],
    *,
    draws: int = DRAWS,
    seed: int = 0,
    level: float = LEVEL,
) -> dict[str, Any]:
    """The `intervals` entry of metrics.json."""
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(proba, dtype=np.float64)
    if len(lesions) != y.size:
        raise ValueError(f"{len(lesions)} lesion ids for {y.size} images")
    samples = _resamples(lesions, draws, seed)
    support = np.bincount(y, minlength=NUM_CLASSES)
    per_class: dict[str, Any] = {}
    for k, name in enumerate(CLASSES):
        lesions_k = {lesion for lesion, label in zip(lesions, y, strict=True) if label == k}
        recalls = [_recall(y[s], p[s].argmax(axis=1), k) for s in samples]
        per_class[name] = {
            "recall": _bounds(recalls, level),
            "images": int(support[k]),
            "lesions": len(lesions_k),
            "few_images": bool(support[k] < FEW_IMAGES),
        }
    return {
        "level": level,
        "draws": draws,
        "unit": "lesion",
        "n_lesions": len(set(lesions)),
        **{name: _bounds([f(y[s], p[s]) for s in samples], level) for name, f in SCORES.items()},
        "per_class": per_class,
    }


def paired_gain(
    y_true: Any,
    candidate: Any,
    champion: Any,
    lesions: Sequence[str],
    metric: str,
    *,
    draws: int = DRAWS,
    seed: int = 0,
    level: float = LEVEL,
) -> dict[str, Any]:
    """Candidate minus champion on the same images: the point gain and its interval."""
    score = SCORES[metric]
    y = np.asarray(y_true, dtype=np.int64)
    a = np.asarray(candidate, dtype=np.float64)
    b = np.asarray(champion, dtype=np.float64)
    gains: list[float | None] = []
    for s in _resamples(lesions, draws, seed):
        ga, gb = score(y[s], a[s]), score(y[s], b[s])
        gains.append(None if ga is None or gb is None else ga - gb)
    pa, pb = score(y, a), score(y, b)
    return {
        "metric": metric,
        "gain": None if pa is None or pb is None else pa - pb,
        "interval": _bounds(gains, level),
        "level": level,
        "draws": draws,
        "unit": "lesion",
    }
