"""Complete typed stage results for the tests that commit hand-made stage outputs."""

from __future__ import annotations

from typing import Any

from skinlesion.classes import CLASSES
from skinlesion.results import (
    EvaluateResult,
    PrepareResult,
    Preprocessing,
    Shards,
    TrainResult,
)


def _count(shards: Shards, split: str) -> int:
    return sum(int(s["count"]) for s in shards.get(split, []))


def prepare_result(
    shards: Shards,
    image_size: int,
    *,
    counts: dict[str, dict[str, int]] | None = None,
    resize: str = "squash",
    jpeg_quality: int = 95,
    synthetic: bool = True,
    lesions_in_both: int = 0,
    split: str = "lesion",
) -> PrepareResult:
    return PrepareResult(
        shards=shards,
        counts=counts if counts is not None else {"train": {}, "val": {}},
        lesions_in_both=lesions_in_both,
        skipped=[],
        image_size=image_size,
        resize=resize,
        jpeg_quality=jpeg_quality,
        split=split,
        val_fraction=0.2,
        synthetic=synthetic,
        n_images=_count(shards, "train") + _count(shards, "val"),
        classes=list(CLASSES),
        seconds=0.0,
    )


def train_result(image_size: int, phase: str = "top", **changes: Any) -> TrainResult:
    fields: dict[str, Any] = {
        "phase": phase,
        "backbone": "mobilenetv3small",
        "weights": "none",
        "image_size": image_size,
        "best_val_accuracy": 0.5,
        "best_epoch": 1,
        "epochs_run": 2,
        "stop_reason": None,
        "resumed_from_epoch": None,
        "images_per_s": None,
        "train_images": 0,
        "val_images": 0,
        "class_weights": None,
        "trainable_params": 0,
        "batch_size": 8,
        "mixed_precision": False,
        "replicas": 1,
        "data_path": {"inputs": "memory", "features": "off", "reason": "test", "layer": ""},
    }
    return TrainResult(**{**fields, **changes})


def evaluate_result(
    model_sha256: str, preprocessing: Preprocessing, metrics: dict[str, Any] | None = None
) -> EvaluateResult:
    return EvaluateResult(
        metrics=metrics or {},
        preprocessing=preprocessing,
        synthetic=True,
        model_stage="train",
        model_sha256=model_sha256,
    )
