"""What each stage records in its manifest beyond the commit protocol: one dataclass per
stage, written by the stage and read back, typed, by the stages after it.

Every manifest carries `schema_version` (SCHEMA_VERSION when written). A reader refuses a
manifest of another version, or one written before versions existed, with a one-line
error naming the file and what to do (rerun that stage); a missing field is named too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from skinlesion.errors import InputError

SCHEMA_VERSION = 1
VERSION_FIELD = "schema_version"
Shards = dict[str, list[dict[str, Any]]]  # split -> [{"file": ..., "count": n}, ...]


@dataclass(frozen=True)
class Preprocessing:
    """How the images a model sees are made from a source image (prepare's resize)."""

    image_size: int
    resize: str  # squash | crop
    jpeg_quality: int


@dataclass(frozen=True)
class Result:
    stages: ClassVar[tuple[str, ...]]  # the stages that write this body

    def to_manifest(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PrepareResult(Result):
    stages = ("prepare",)
    shards: Shards
    counts: dict[str, dict[str, int]]  # train | val -> class -> images
    lesions_in_both: int
    skipped: list[dict[str, Any]]
    image_size: int
    resize: str
    jpeg_quality: int
    split: str
    val_fraction: float
    synthetic: bool
    n_images: int
    classes: list[str]
    seconds: float

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(self.image_size, self.resize, self.jpeg_quality)


@dataclass(frozen=True)
class AugmentResult(Result):
    stages = ("augment",)
    shards: Shards  # train only
    counts: dict[str, dict[str, int]]  # before | after -> class -> images
    target: int
    variants: int
    n_images: int
    image_size: int
    synthetic: bool


@dataclass(frozen=True)
class TrainResult(Result):
    stages = ("train", "finetune")
    phase: str
    backbone: str
    weights: str
    image_size: int
    best_val_accuracy: float | None
    best_epoch: int | None
    epochs_run: int
    stop_reason: str | None
    resumed_from_epoch: int | None
    images_per_s: float | None
    train_images: int
    val_images: int
    class_weights: dict[str, float] | None
    trainable_params: int
    batch_size: int
    mixed_precision: bool
    replicas: int
    # How the phase fed its model: inputs "memory" (decoded once) or "stream"; features
    # "pooled" | "block" (frozen layers cached: layer) | "off", with the reason.
    data_path: dict[str, Any]


@dataclass(frozen=True)
class EvaluateResult(Result):
    stages = ("evaluate",)
    metrics: dict[str, Any]  # the headline figures (metrics.headline)
    preprocessing: Preprocessing
    synthetic: bool
    model_stage: str
    model_sha256: str  # what promote checks it is promoting


@dataclass(frozen=True)
class PromoteResult(Result):
    stages = ("promote",)
    decision: dict[str, Any]  # also decision.json


@dataclass(frozen=True)
class ChampionResult(Result):
    stages = ("champion",)
    model_sha256: str
    model_fingerprint: str
    model_uri: str
    model_stage: str
    evaluation_uri: str
    evaluation_fingerprint: str
    val_data_fingerprint: str
    run_id: str
    promoted_at: str
    metric: str
    metric_value: float | None
    mel_recall: float | None
    metrics: dict[str, Any]
    preprocessing: Preprocessing
    synthetic: bool
    backbone: str
    image_size: int
    settings: dict[str, Any]


R = TypeVar("R", bound=Result)
_PREPROCESSING = {f.name for f in dataclasses.fields(Preprocessing)}


def parse_result(cls: type[R], manifest: dict[str, Any], where: str) -> R:
    """The typed body of a committed manifest (`where` names it in errors)."""
    version = manifest.get(VERSION_FIELD)
    if version != SCHEMA_VERSION:
        found = (
            "no schema_version (written by an older skinlesion)"
            if version is None
            else (f"schema_version {version!r}")
        )
        raise InputError(
            f"{where}: {found}, this version reads {SCHEMA_VERSION}; rerun that stage "
            "(--force) to rewrite it"
        )
    if manifest.get("stage") not in cls.stages:
        raise InputError(
            f"{where}: a '{manifest.get('stage')}' output, expected {' or '.join(cls.stages)}"
        )
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in manifest:
            raise InputError(f"{where}: manifest field '{f.name}' is missing")
        value = manifest[f.name]
        if f.name == "preprocessing":
            if not isinstance(value, dict) or set(value) != _PREPROCESSING:
                raise InputError(f"{where}: manifest field 'preprocessing' is malformed")
            value = Preprocessing(**value)
        values[f.name] = value
    return cls(**values)
