"""The data of a training phase: train and val shards, their counts, image size and the
class weights (when augment has not balanced the training set)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from skinlesion import shards
from skinlesion.classes import NUM_CLASSES
from skinlesion.errors import InputError
from skinlesion.manifest import read_result, require_manifest
from skinlesion.results import AugmentResult, PrepareResult
from skinlesion.storage import Store


@dataclass(frozen=True)
class TrainData:
    train_paths: list[Path]
    val_paths: list[Path]
    train_count: int
    val_count: int
    image_size: int
    label_counts: list[int]  # of the train split, per class
    balanced_by_augment: bool  # the train split is an augment output
    train_uri: str
    val_uri: str


def load_train_data(train_data: Store, val_data: Store, dest: Path) -> TrainData:
    """Download the train split of `train_data` and the val split of `val_data`."""
    train: AugmentResult | PrepareResult
    if require_manifest(train_data, "train_data")["stage"] == "augment":
        _, train = read_result(train_data, AugmentResult, "train_data")
    else:
        _, train = read_result(train_data, PrepareResult, "train_data")
    _, val = read_result(val_data, PrepareResult, "val_data")
    sizes = sorted({train.image_size, val.image_size})
    if len(sizes) > 1:
        raise InputError(f"train and val data have different image sizes: {sizes}")
    train_paths = shards.fetch_split(train_data, train.shards, "train", dest / "train")
    val_paths = shards.fetch_split(val_data, val.shards, "val", dest / "val")
    return TrainData(
        train_paths=train_paths,
        val_paths=val_paths,
        train_count=shards.shard_count(train.shards, "train", train_data.uri),
        val_count=shards.shard_count(val.shards, "val", val_data.uri),
        image_size=sizes[0],
        label_counts=_label_counts(train_paths),
        balanced_by_augment=isinstance(train, AugmentResult),
        train_uri=train_data.uri,
        val_uri=val_data.uri,
    )


def _label_counts(paths: list[Path]) -> list[int]:
    labels = shards.labels(paths)
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise InputError(f"training labels out of range 0..{NUM_CLASSES - 1}")
    return [int(n) for n in np.bincount(labels, minlength=NUM_CLASSES)]


def balanced_class_weights(counts: list[int]) -> dict[int, float]:
    """sklearn's "balanced": n / (classes present * n_c), for the classes present."""
    present = [c for c in counts if c > 0]
    total = sum(present)
    return {i: total / (len(present) * c) for i, c in enumerate(counts) if c > 0}


def class_weights(mode: str, data: TrainData) -> dict[int, float] | None:
    """The `train.class_weights` setting resolved: auto is none for augment output."""
    if mode == "auto":
        mode = "none" if data.balanced_by_augment else "balanced"
    return balanced_class_weights(data.label_counts) if mode == "balanced" else None
