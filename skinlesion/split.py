"""Train/val splits of the HAM10000 metadata.

- `lesion` (default): stratified by `dx` and grouped by `lesion_id`: no lesion
  has images on both sides, each class sends about `val_fraction` of its images
  to val. Lesions never span classes (validated), so the split is done class by
  class: shuffle the class's lesions with the seed, then add a lesion to val
  whenever that brings the class's val count closer to its target.
- `lesion-hash`: grouped by `lesion_id`, each lesion sent to val when a stable hash of
  (seed, lesion_id) falls below `val_fraction`. The side of a lesion depends on nothing
  else, so as the data grows no lesion ever changes sides (an earlier champion's val
  lesions stay val); stratification by `dx` holds only in expectation: the share of
  each class's images in val is logged, with a warning when a class with at least
  `HASH_CHECKED_LESIONS` lesions misses `val_fraction` by more than its tolerance:
  `HASH_TOLERANCE`, or three binomial standard deviations over its lesions if wider
  (a fair hash misses that rarely).
  The default for scheduled runs (the chart's values).
- `seed`: the reference's image-level `train_test_split(df, test_size=0.2,
  random_state=101, stratify=df["dx"])` (leaks lesions across the split).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from skinlesion import logs
from skinlesion.classes import CLASSES
from skinlesion.errors import DataError

Method = Literal["lesion", "lesion-hash", "seed"]
HASH_TOLERANCE = 0.05  # of a class's images in val, for classes with enough lesions
HASH_CHECKED_LESIONS = 50


@dataclass(frozen=True)
class Split:
    method: Method
    train: pd.DataFrame
    val: pd.DataFrame

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        """{"train": {cls: n}, "val": {cls: n}} over every class, canonical order."""
        return {"train": class_counts(self.train), "val": class_counts(self.val)}

    @property
    def lesions_in_both(self) -> int:
        return lesions_in_both(self.train, self.val)

    def summary(self) -> dict[str, object]:
        return {
            "split": self.method,
            "counts": self.counts,
            "lesions_in_both": self.lesions_in_both,
        }


def class_counts(frame: pd.DataFrame) -> dict[str, int]:
    counts = frame["dx"].value_counts()
    return {name: int(counts.get(name, 0)) for name in CLASSES}


def lesions_in_both(train: pd.DataFrame, val: pd.DataFrame) -> int:
    return len(set(train["lesion_id"]) & set(val["lesion_id"]))


def seed_split(frame: pd.DataFrame, val_fraction: float = 0.2, seed: int = 101) -> Split:
    """Exactly `train_test_split(frame, test_size, random_state, stratify=frame["dx"])`."""
    try:
        train, val = train_test_split(
            frame, test_size=val_fraction, random_state=seed, stratify=frame["dx"]
        )
    except ValueError as exc:  # e.g. a class with a single image
        raise DataError(f"seed split impossible: {exc}") from None
    return Split("seed", train, val)


def _val_lesions(sizes: pd.Series, fraction: float, rng: np.random.Generator) -> list[str]:
    """Greedy pick of one class's lesions (index: lesion_id, value: images) for val."""
    order = sizes.index.to_numpy()[rng.permutation(len(sizes))]
    target = fraction * int(sizes.sum())
    chosen: list[str] = []
    total = 0
    for lesion in order:
        n = int(sizes[lesion])
        if abs(total + n - target) < abs(total - target) or not chosen:
            chosen.append(lesion)
            total += n
    if len(chosen) == len(sizes):  # keep at least one lesion for training
        chosen.pop()
    return chosen


def lesion_split(frame: pd.DataFrame, val_fraction: float = 0.2, seed: int = 101) -> Split:
    """Stratified by dx, grouped by lesion_id; both sides shuffled with the seed."""
    rng = np.random.default_rng(seed)
    val_ids: set[str] = set()
    for name in CLASSES:
        rows = frame[frame["dx"] == name]
        if rows.empty:
            continue
        sizes = rows.groupby("lesion_id", sort=True).size()
        val_ids.update(_val_lesions(sizes, val_fraction, rng))
    in_val = frame["lesion_id"].isin(val_ids).to_numpy()
    order = rng.permutation(len(frame))  # mix classes within each side (stable per seed)
    shuffled = frame.iloc[order]
    return Split("lesion", shuffled[~in_val[order]], shuffled[in_val[order]])


def lesion_unit(lesion_id: str, seed: int) -> float:
    """A stable number in [0, 1) for a lesion: the first 8 bytes of sha256(seed:lesion_id)."""
    digest = hashlib.sha256(f"{seed}:{lesion_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def lesion_hash_split(frame: pd.DataFrame, val_fraction: float = 0.2, seed: int = 101) -> Split:
    """Each lesion to val when its stable hash is below `val_fraction`."""
    lesions = pd.unique(frame["lesion_id"])
    val_ids = {str(le) for le in lesions if lesion_unit(str(le), seed) < val_fraction}
    in_val = frame["lesion_id"].isin(val_ids).to_numpy()
    order = np.random.default_rng(seed).permutation(len(frame))
    shuffled = frame.iloc[order]
    split = Split("lesion-hash", shuffled[~in_val[order]], shuffled[in_val[order]])
    _check_strata(frame, split, val_fraction)
    return split


def hash_tolerance(val_fraction: float, lesions: int) -> float:
    """How far a class's val share may stray under the hash before a warning."""
    return max(HASH_TOLERANCE, 3.0 * (val_fraction * (1 - val_fraction) / lesions) ** 0.5)


def _check_strata(frame: pd.DataFrame, split: Split, val_fraction: float) -> None:
    counts = split.counts
    shares = {}
    for name in CLASSES:
        total = counts["train"][name] + counts["val"][name]
        if total:
            shares[name] = round(counts["val"][name] / total, 4)
    lesions = frame.groupby("dx")["lesion_id"].nunique()
    off = [
        name
        for name, share in shares.items()
        if (n := int(lesions.get(name, 0))) >= HASH_CHECKED_LESIONS
        and abs(share - val_fraction) > hash_tolerance(val_fraction, n)
    ]
    log = logs.get()
    log.info("split_strata", split="lesion-hash", val_share=shares, target=val_fraction)
    if off:
        log.warning(
            "split_strata_off",
            classes=off,
            tolerance=HASH_TOLERANCE,
            hint="another prepare.seed gives another hash; keep it fixed once scheduled",
        )


def check_every_class(split: Split, skipped: int = 0) -> None:
    """Each class must have images on both sides (evaluation needs every class);
    `skipped`: images left out as unreadable, named as the cause."""
    for side, counts in split.counts.items():
        empty = [name for name, n in counts.items() if n == 0]
        if empty:
            hint = (
                f"emptied by the {skipped} skipped unreadable image(s)"
                if skipped
                else {
                    "lesion": "each class needs at least 2 lesions",
                    "lesion-hash": "too few lesions of the class for its hash to reach both sides",
                    "seed": "each class needs at least 2 images",
                }[split.method]
            )
            raise DataError(
                f"{split.method} split: no {side} images of class(es) {', '.join(empty)} ({hint})"
            )


def make_split(
    frame: pd.DataFrame, method: Method, val_fraction: float = 0.2, seed: int = 101
) -> Split:
    """The split of `frame` by `method`, checked to hold every class on both sides."""
    how = {"lesion": lesion_split, "lesion-hash": lesion_hash_split, "seed": seed_split}[method]
    split = how(frame, val_fraction, seed)
    check_every_class(split)
    return split
