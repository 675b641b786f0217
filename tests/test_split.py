"""Splits: lesion-grouped stratified (default) and the reference's image-level seed split."""

from __future__ import annotations

import itertools

import pandas as pd
import pytest
from sklearn.model_selection import train_test_split

from skinlesion import synthetic
from skinlesion.classes import CLASSES
from skinlesion.errors import DataError
from skinlesion.ham10000 import parse_metadata
from skinlesion.split import lesion_split, make_split, seed_split
from skinlesion.synthetic.metadata import REAL_IMAGES_PER_CLASS

REAL_COUNTS = REAL_IMAGES_PER_CLASS  # the published HAM10000 class counts
REFERENCE_TRAIN = {
    "nv": 5364,
    "mel": 890,
    "bkl": 879,
    "bcc": 411,
    "akiec": 262,
    "vasc": 114,
    "df": 92,
}
REFERENCE_VAL = {"nv": 1341, "mel": 223, "bkl": 220, "bcc": 103, "akiec": 65, "vasc": 28, "df": 23}


def metadata(images: int, seed: int = 0) -> pd.DataFrame:
    """A realistic metadata frame (lesions with several images) without drawing images."""
    return parse_metadata(synthetic.metadata_csv(synthetic.plan(images, seed)))


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return metadata(3000)


def test_lesion_split_has_no_lesion_on_both_sides(frame: pd.DataFrame) -> None:
    split = make_split(frame, "lesion", 0.2, 101)
    assert split.lesions_in_both == 0
    assert not set(split.train["lesion_id"]) & set(split.val["lesion_id"])
    assert len(split.train) + len(split.val) == len(frame)
    assert set(split.train["image_id"]) | set(split.val["image_id"]) == set(frame["image_id"])


@pytest.mark.parametrize("fraction", [0.2, 0.3])
def test_lesion_split_is_stratified_near_the_fraction(frame: pd.DataFrame, fraction: float) -> None:
    split = make_split(frame, "lesion", fraction, 101)
    assert abs(len(split.val) / len(frame) - fraction) < 0.01
    biggest_lesion = int(frame.groupby("lesion_id").size().max())
    for name in CLASSES:
        total = split.counts["train"][name] + split.counts["val"][name]
        assert split.counts["train"][name] > 0 and split.counts["val"][name] > 0
        # Each class is within one lesion of its own target.
        assert abs(split.counts["val"][name] - fraction * total) <= biggest_lesion


def test_lesion_split_is_deterministic_per_seed(frame: pd.DataFrame) -> None:
    a, b = lesion_split(frame, 0.2, 7), lesion_split(frame, 0.2, 7)
    assert list(a.val["image_id"]) == list(b.val["image_id"])
    assert list(a.train["image_id"]) == list(b.train["image_id"])
    other = lesion_split(frame, 0.2, 8)
    assert set(other.val["image_id"]) != set(a.val["image_id"])


def test_lesion_split_mixes_classes_within_each_side(frame: pd.DataFrame) -> None:
    # Shards are written in this order: a class must not come in one block.
    dx = list(lesion_split(frame, 0.2, 101).train["dx"])
    changes = sum(1 for x, y in itertools.pairwise(dx) if x != y)
    assert changes > len(dx) // 4


def test_seed_split_is_exactly_the_sklearn_call(frame: pd.DataFrame) -> None:
    split = seed_split(frame, 0.2, 101)
    train, val = train_test_split(frame, test_size=0.2, random_state=101, stratify=frame["dx"])
    assert list(split.train.index) == list(train.index)
    assert list(split.val.index) == list(val.index)
    assert split.lesions_in_both > 0  # the reference's known leak


def test_seed_split_reproduces_the_reference_counts() -> None:
    # One row per image with the real class counts (the CSV order of the real file
    # does not change stratified counts, which depend on the class sizes and seed).
    dx = [name for name, n in REAL_COUNTS.items() for _ in range(n)]
    frame = pd.DataFrame(
        {
            "lesion_id": [f"HAM_{i:07d}" for i in range(len(dx))],
            "image_id": [f"ISIC_{24306 + i:07d}" for i in range(len(dx))],
            "dx": dx,
        }
    )
    split = make_split(frame, "seed", 0.2, 101)
    assert split.counts == {
        "train": {c: REFERENCE_TRAIN[c] for c in CLASSES},
        "val": {c: REFERENCE_VAL[c] for c in CLASSES},
    }


def test_a_class_with_one_lesion_cannot_be_on_both_sides(frame: pd.DataFrame) -> None:
    df_lesions = frame.loc[frame["dx"] == "df", "lesion_id"].unique()
    keep = (frame["dx"] != "df") | (frame["lesion_id"] == df_lesions[0])
    with pytest.raises(DataError, match=r"lesion split: no (train|val) images of class\(es\) df"):
        make_split(frame[keep].reset_index(drop=True), "lesion", 0.2, 101)


def test_seed_split_of_a_single_image_class_is_a_data_error(frame: pd.DataFrame) -> None:
    first_df = frame.index[frame["dx"] == "df"][0]
    keep = (frame["dx"] != "df") | (frame.index == first_df)
    with pytest.raises(DataError, match="seed split impossible"):
        make_split(frame[keep].reset_index(drop=True), "seed", 0.2, 101)


def test_summary_is_the_dry_run_shape(frame: pd.DataFrame) -> None:
    summary = make_split(frame, "lesion", 0.2, 101).summary()
    assert set(summary) == {"split", "counts", "lesions_in_both"}
    assert list(summary["counts"]["train"]) == list(CLASSES)  # type: ignore[index]
