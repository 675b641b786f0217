"""The lesion-hash split: a lesion's side depends on its id alone, so growing data never
moves an earlier validation lesion into training."""

from __future__ import annotations

import io

import pandas as pd
import pytest

from skinlesion.classes import CLASSES
from skinlesion.errors import DataError
from skinlesion.split import HASH_TOLERANCE, lesion_split, lesion_unit, make_split
from skinlesion.synthetic.metadata import metadata_csv, plan


def _frame(images: int, seed: int = 7) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(metadata_csv(plan(images, seed))))


def _sides(frame: pd.DataFrame, method: str) -> dict[str, str]:
    split = make_split(frame, method, 0.2, 101)  # type: ignore[arg-type]
    sides = {le: "train" for le in split.train["lesion_id"]}
    sides.update({le: "val" for le in split.val["lesion_id"]})
    return sides


def test_growing_from_1000_to_2000_images_moves_no_lesion() -> None:
    """The earlier set: whole lesions, drawn at random from 2,000 synthetic images, up to
    1,000 images; the later set: all 2,000."""
    later = _frame(2000)
    first = later["lesion_id"].drop_duplicates().sample(frac=1.0, random_state=0)
    sizes = later.groupby("lesion_id").size()
    kept = set(first[sizes[first].cumsum().to_numpy() <= 1000])
    earlier = later[later["lesion_id"].isin(kept)]
    assert 900 <= len(earlier) <= 1000 and earlier["dx"].nunique() == len(CLASSES)

    before, after = _sides(earlier, "lesion-hash"), _sides(later, "lesion-hash")
    moved = [le for le, side in before.items() if after[le] != side]
    assert moved == []
    assert sum(side == "val" for side in before.values()) > 0
    # The stratified greedy split has no such guarantee: it re-deals the lesions.
    greedy_before, greedy_after = _sides(earlier, "lesion"), _sides(later, "lesion")
    assert any(greedy_after[le] != side for le, side in greedy_before.items())


def test_each_class_is_near_its_share_and_no_lesion_is_on_both_sides() -> None:
    frame = _frame(2000)
    split = make_split(frame, "lesion-hash", 0.2, 101)
    assert split.lesions_in_both == 0
    assert len(split.train) + len(split.val) == len(frame)
    lesions = frame.groupby("dx")["lesion_id"].nunique()
    for name in CLASSES:
        total = split.counts["train"][name] + split.counts["val"][name]
        if lesions[name] >= 50:
            assert abs(split.counts["val"][name] / total - 0.2) <= HASH_TOLERANCE + 0.05, name


def test_the_hash_is_stable_and_seeded() -> None:
    assert lesion_unit("HAM_0000118", 101) == lesion_unit("HAM_0000118", 101)
    assert lesion_unit("HAM_0000118", 101) != lesion_unit("HAM_0000118", 102)
    # Pinned: a change of the hash would move every scheduled run's lesions.
    assert lesion_unit("HAM_0000118", 101) == pytest.approx(
        int.from_bytes(__import__("hashlib").sha256(b"101:HAM_0000118").digest()[:8], "big")
        / 2.0**64
    )


def test_a_class_whose_lesions_all_hash_to_one_side_is_a_clear_error() -> None:
    frame = _frame(2000)
    one = frame[frame["dx"] == "df"]["lesion_id"].iloc[0]
    tiny = pd.concat([frame[frame["dx"] != "df"], frame[frame["lesion_id"] == one]])
    with pytest.raises(DataError, match=r"lesion-hash split: no (train|val) images of class"):
        make_split(tiny, "lesion-hash", 0.2, 101)


def test_the_greedy_split_is_unchanged() -> None:
    frame = _frame(1000)
    assert lesion_split(frame, 0.2, 101).method == "lesion"
