"""Every metrics.json figure against an independent scikit-learn computation."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from skinlesion.classes import CLASSES, INDEX, MELANOMA
from skinlesion.metrics import KEYS, MEL_KEY, compute_metrics, expected_calibration_error

MEL = INDEX[MELANOMA]
LABELS = list(range(len(CLASSES)))


def _random_case(seed: int, n: int, classes: list[int] | None = None, skill: float = 2.0):
    """Labels drawn from `classes`, probabilities that lean (noisily) towards the truth."""
    rng = np.random.default_rng(seed)
    pool = np.array(classes if classes is not None else LABELS)
    y = rng.choice(pool, size=n)
    logits = rng.normal(size=(n, len(CLASSES)))
    logits[np.arange(n), y] += skill * rng.random(n)
    proba = np.exp(logits)
    proba /= proba.sum(axis=1, keepdims=True)
    return y, proba


def _sklearn_reference(y: np.ndarray, proba: np.ndarray) -> dict:
    pred = proba.argmax(axis=1)
    prec, rec, f1, sup = skm.precision_recall_fscore_support(
        y, pred, labels=LABELS, zero_division=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true"
        balanced = skm.balanced_accuracy_score(y, pred)
    present = sorted(set(y.tolist()))
    if len(present) == len(CLASSES) and np.allclose(proba.sum(axis=1), 1):
        auc = skm.roc_auc_score(y, proba, multi_class="ovr", average="macro")
    elif len(present) >= 2:
        auc = float(np.mean([skm.roc_auc_score(y == k, proba[:, k]) for k in present]))
    else:
        auc = None
    is_mel = y == MEL
    if is_mel.any() and not is_mel.all():
        fpr, tpr, _ = skm.roc_curve(is_mel, proba[:, MEL], drop_intermediate=False)
        sens = float(tpr[fpr <= 0.2 + 1e-12].max())
    else:
        sens = None
    return {
        "accuracy": skm.accuracy_score(y, pred),
        "balanced_accuracy": balanced,
        "macro_f1": skm.f1_score(y, pred, average="macro", zero_division=0),
        "per_class": {
            name: {
                "precision": prec[k],
                "recall": rec[k],
                "f1": f1[k],
                "support": int(sup[k]),
            }
            for k, name in enumerate(CLASSES)
        },
        "confusion_matrix": skm.confusion_matrix(y, pred, labels=LABELS).tolist(),
        "roc_auc_macro": auc,
        "sens": sens,
    }


def _assert_matches(y: np.ndarray, proba: np.ndarray) -> dict:
    got = compute_metrics(y, proba, ece_bins=15)
    ref = _sklearn_reference(y, proba)
    assert tuple(got) == KEYS
    assert got["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-12)
    assert got["balanced_accuracy"] == pytest.approx(ref["balanced_accuracy"], abs=1e-12)
    assert got["macro_f1"] == pytest.approx(ref["macro_f1"], abs=1e-12)
    assert list(got["per_class"]) == list(CLASSES)
    for name in CLASSES:
        row, want = got["per_class"][name], ref["per_class"][name]
        assert set(row) == {"precision", "recall", "f1", "support"}
        for key in ("precision", "recall", "f1"):
            assert row[key] == pytest.approx(want[key], abs=1e-12), (name, key)
        assert row["support"] == want["support"]
    assert got["confusion_matrix"] == ref["confusion_matrix"]
    if ref["roc_auc_macro"] is None:
        assert got["roc_auc_macro"] is None
    else:
        assert got["roc_auc_macro"] == pytest.approx(ref["roc_auc_macro"], abs=1e-12)
    assert set(got["melanoma"]) == {MEL_KEY}
    if ref["sens"] is None:
        assert got["melanoma"][MEL_KEY] is None
    else:
        assert got["melanoma"][MEL_KEY] == pytest.approx(ref["sens"], abs=1e-12)
    assert got["n_images"] == len(y)
    assert 0.0 <= got["ece"] <= 1.0
    # Plain JSON types only: round-trips exactly.
    assert json.loads(json.dumps(got, allow_nan=False)) == got
    return got


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n", [25, 400])
def test_random_inputs_match_sklearn(seed: int, n: int) -> None:
    y, proba = _random_case(seed, n)
    _assert_matches(y, proba)


def test_realistic_imbalance_matches_sklearn() -> None:
    rng = np.random.default_rng(7)
    freq = np.array([327, 514, 1099, 115, 1113, 6705, 142], dtype=float)
    y = rng.choice(len(CLASSES), size=2003, p=freq / freq.sum())
    _, proba = _random_case(8, y.size)
    logits = np.log(proba)
    logits[np.arange(y.size), y] += 1.5
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    _assert_matches(y, proba)


def test_classes_absent_from_truth() -> None:
    # No df (3) and no vasc (6) in y_true: AUC macro averages the 5 present classes,
    # the confusion matrix still has all 7 rows/columns.
    y, proba = _random_case(3, 200, classes=[0, 1, 2, 4, 5])
    got = _assert_matches(y, proba)
    assert got["per_class"]["df"]["support"] == 0
    assert got["per_class"]["df"]["recall"] == 0.0
    assert len(got["confusion_matrix"]) == 7
    assert all(len(row) == 7 for row in got["confusion_matrix"])
    assert sum(got["confusion_matrix"][3]) == 0


def test_melanoma_absent() -> None:
    y, proba = _random_case(4, 120, classes=[0, 1, 2, 3, 5, 6])
    got = _assert_matches(y, proba)
    assert got["melanoma"][MEL_KEY] is None


def test_only_melanoma() -> None:
    y, proba = _random_case(5, 30, classes=[MEL])
    got = _assert_matches(y, proba)
    assert got["roc_auc_macro"] is None
    assert got["melanoma"][MEL_KEY] is None
    assert got["balanced_accuracy"] == got["per_class"]["mel"]["recall"]


def test_class_never_predicted_and_predicted_but_absent() -> None:
    y, proba = _random_case(6, 150, classes=[0, 1, 2, 4, 5, 6])
    proba[:, 0] = 0.0  # akiec never predicted although present
    proba[:5, 3] = 5.0  # df predicted although absent
    proba /= proba.sum(axis=1, keepdims=True)
    got = _assert_matches(y, proba)
    assert got["per_class"]["akiec"]["precision"] == 0.0
    assert got["per_class"]["df"]["precision"] == 0.0


def test_perfect_predictions() -> None:
    y = np.repeat(np.arange(7), 5)
    proba = np.full((y.size, 7), 0.01)
    proba[np.arange(y.size), y] = 0.94
    got = _assert_matches(y, proba)
    assert got["accuracy"] == got["balanced_accuracy"] == got["macro_f1"] == 1.0
    assert got["roc_auc_macro"] == 1.0
    assert got["melanoma"][MEL_KEY] == 1.0
    assert got["ece"] == pytest.approx(0.06)


@pytest.mark.parametrize("seed", range(4))
def test_tied_scores_match_sklearn(seed: int) -> None:
    # Coarse probabilities produce many ties for the AUC and the threshold sweep.
    y, proba = _random_case(10 + seed, 300)
    proba = np.round(proba, 1)
    _assert_matches(y, proba)


def test_single_image() -> None:
    got = _assert_matches(np.array([MEL]), np.eye(7)[[MEL]])
    assert got["n_images"] == 1


def test_melanoma_sensitivity_hand_worked() -> None:
    # 5 melanomas, 10 others. Specificity >= 0.8 allows at most 2 of the 10 negatives
    # above the threshold (0.9, 0.8); the lowest such threshold is 0.7 (the next negative
    # is 0.6), where the positives 0.95, 0.85 and 0.7 are found: sensitivity 3/5.
    pos = [0.95, 0.85, 0.7, 0.4, 0.3]
    neg = [0.9, 0.8, 0.6, 0.5, 0.2, 0.1, 0.1, 0.05, 0.05, 0.01]
    score = np.array(pos + neg)
    y = np.array([MEL] * 5 + [5] * 10)
    proba = np.zeros((15, 7))
    proba[:, MEL] = score
    proba[:, 5] = 1 - score
    got = compute_metrics(y, proba)
    assert got["melanoma"][MEL_KEY] == pytest.approx(3 / 5)


def test_ece_hand_worked() -> None:
    # 5 bins of width 0.2. Top-label confidences and correctness:
    #   0.30 right, 0.35 wrong          -> bin (0.2, 0.4]: acc 0.5, conf 0.325, |.| 0.175
    #   0.60 right (on the edge: (0.4, 0.6]), 0.50 wrong -> acc 0.5, conf 0.55, |.| 0.05
    #   0.90 right, 0.90 right, 1.00 wrong  -> bin (0.8, 1]: acc 2/3, conf 14/15, |.| 4/15
    # ECE = (2 * 0.175 + 2 * 0.05 + 3 * 4/15) / 7
    conf = [0.30, 0.35, 0.60, 0.50, 0.90, 0.90, 1.00]
    right = [True, False, True, False, True, True, False]
    y = np.zeros(7, dtype=int)
    proba = np.zeros((7, 7))
    for i, (c, ok) in enumerate(zip(conf, right, strict=True)):
        top = 0 if ok else 1
        proba[i, top] = c
        rest = [k for k in range(7) if k != top]
        proba[i, rest] = (1 - c) / 6  # each below c, so `top` stays the argmax
    expected = (2 * 0.175 + 2 * 0.05 + 3 * 4 / 15) / 7
    assert expected_calibration_error(y, proba, bins=5) == pytest.approx(expected, abs=1e-12)
    assert compute_metrics(y, proba, ece_bins=5)["ece"] == pytest.approx(expected, abs=1e-12)
    # One bin: |overall accuracy - mean confidence|.
    assert expected_calibration_error(y, proba, bins=1) == pytest.approx(
        abs(4 / 7 - np.mean(conf)), abs=1e-12
    )


@pytest.mark.parametrize(
    ("y", "proba", "match"),
    [
        (np.array([0, 1]), np.full((2, 6), 1 / 6), "shape"),
        (np.array([0, 9]), np.full((2, 7), 1 / 7), "labels"),
        (np.array([0.0, 1.0]), np.full((2, 7), 1 / 7), "integer"),
        (np.array([], dtype=int), np.zeros((0, 7)), "non-empty"),
        (np.array([0, 1]), np.array([[np.nan] * 7, [1 / 7] * 7]), "NaN"),
    ],
)
def test_bad_inputs_are_refused(y: np.ndarray, proba: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compute_metrics(y, proba)
