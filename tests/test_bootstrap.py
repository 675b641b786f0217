"""Lesion-level bootstrap intervals and the paired gain of two models on the same images."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from skinlesion import bootstrap
from skinlesion.classes import CLASSES, NUM_CLASSES


def _data(n: int, skill: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, NUM_CLASSES, n)
    logits = rng.normal(size=(n, NUM_CLASSES))
    logits[np.arange(n), y] += skill
    p = np.exp(logits)
    return y, p / p.sum(axis=1, keepdims=True)


def test_scores_match_scikit_learn() -> None:
    y, p = _data(300, 1.5, 0)
    pred = p.argmax(axis=1)
    assert bootstrap.balanced_accuracy(y, p) == pytest.approx(balanced_accuracy_score(y, pred))
    assert bootstrap.macro_f1(y, p) == pytest.approx(f1_score(y, pred, average="macro"))
    auc = roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert bootstrap.roc_auc_macro(y, p) == pytest.approx(auc)


def test_intervals_hold_the_point_estimate_and_repeat_for_a_seed() -> None:
    y, p = _data(400, 1.0, 1)
    lesions = [f"L{i}" for i in range(y.size)]
    got = bootstrap.intervals(y, p, lesions, draws=300, seed=3)
    lo, hi = got["balanced_accuracy"]
    assert lo < bootstrap.balanced_accuracy(y, p) < hi
    assert 0.0 < hi - lo < 0.2
    assert got == bootstrap.intervals(y, p, lesions, draws=300, seed=3)
    assert got != bootstrap.intervals(y, p, lesions, draws=300, seed=4)
    assert set(got["per_class"]) == set(CLASSES)
    assert got["n_lesions"] == y.size and got["unit"] == "lesion"


def test_copies_of_one_lesion_do_not_narrow_the_interval() -> None:
    """Five images of each lesion carry the information of one: resampling lesions gives
    the same interval as one image per lesion, where resampling images would narrow it."""
    y, p = _data(200, 1.0, 2)
    lesions = [f"L{i}" for i in range(y.size)]
    once = bootstrap.intervals(y, p, lesions, draws=200, seed=0)
    five = bootstrap.intervals(
        np.repeat(y, 5), np.repeat(p, 5, axis=0), list(np.repeat(lesions, 5)), draws=200, seed=0
    )
    assert five["balanced_accuracy"] == pytest.approx(once["balanced_accuracy"])
    as_images = bootstrap.intervals(
        np.repeat(y, 5), np.repeat(p, 5, axis=0), [str(i) for i in range(1000)], draws=200
    )
    width = lambda r: r["balanced_accuracy"][1] - r["balanced_accuracy"][0]  # noqa: E731
    assert width(as_images) < 0.7 * width(five)


def test_a_class_with_few_images_is_flagged() -> None:
    y, p = _data(400, 1.0, 5)
    y[y == 3] = 0
    y[:4] = 3
    got = bootstrap.intervals(y, p, [f"L{i}" for i in range(y.size)], draws=100)
    row = got["per_class"][CLASSES[3]]
    assert row["images"] == 4 and row["lesions"] == 4 and row["few_images"]
    assert not got["per_class"][CLASSES[0]]["few_images"]


def test_paired_gain_of_a_model_with_itself_is_exactly_zero() -> None:
    y, p = _data(300, 1.0, 6)
    got = bootstrap.paired_gain(y, p, p, [str(i) for i in range(300)], "balanced_accuracy")
    assert got["gain"] == 0.0 and got["interval"] == [0.0, 0.0]


@pytest.mark.parametrize("metric", sorted(bootstrap.SCORES))
def test_a_clearly_better_model_has_a_positive_lower_bound(metric: str) -> None:
    y, weak = _data(500, 0.3, 7)
    _, strong = _data(500, 3.0, 7)  # the same labels: same seed
    lesions = [f"L{i // 2}" for i in range(500)]
    got = bootstrap.paired_gain(y, strong, weak, lesions, metric, draws=200)
    assert got["interval"][0] > 0.0
    back = bootstrap.paired_gain(y, weak, strong, lesions, metric, draws=200)
    assert back["interval"][1] < 0.0


def test_lesion_ids_must_match_the_images() -> None:
    y, p = _data(10, 1.0, 8)
    with pytest.raises(ValueError, match="9 lesion ids for 10 images"):
        bootstrap.intervals(y, p, ["x"] * 9)
