"""Typed configuration: frozen dataclasses loaded once and validated.

Order of precedence: dataclass defaults -> named preset -> YAML file -> CLI
flags. Every error names the offending field (`train.batch_size`). The
resolved config is saved next to each stage's outputs. Each field is declared
with `fields.setting`: its description, range, choices and whether it changes
a stage's output (the fingerprint) live on the field.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from skinlesion import userinput
from skinlesion.backbones import BACKBONES
from skinlesion.classes import CLASSES
from skinlesion.errors import ConfigError, InputError
from skinlesion.fields import build, changes_output, check_ranges, parse_overrides, setting, to_dict

# Every int field has a range. Seeds go to numpy, which takes 0 .. 2**32 - 1.
SEED_MAX = 2**32 - 1
MAX_EPOCHS = 10_000
MAX_IMAGES = 10_000_000
SEED, EPOCHS, SHARD = f"[0, {SEED_MAX}]", f"[1, {MAX_EPOCHS}]", "[1, 1000000]"  # shared ranges
# The two stages reading the train section: the head alone, then fine-tuning the last block.
TOP, FINETUNE = ("train",), ("finetune",)
C = TypeVar("C")


@dataclass(frozen=True)
class PrepareConfig:
    split: Literal["lesion", "lesion-hash", "seed"] = setting(
        "lesion",
        "lesion: grouped by lesion, stratified; lesion-hash: grouped by lesion, each lesion's "
        "side fixed by a stable hash (growing data never moves a lesion); seed: the "
        "reference's image-level split",
    )
    val_fraction: float = setting(0.2, "share of the data held out for validation", "(0, 1)")
    seed: int = setting(101, "seed of the split", SEED)
    image_size: int = setting(224, "side of the square images, in pixels", "[32, 1024]")
    resize: Literal["squash", "crop"] = setting("squash", "squash: plain resize; crop: centre crop")
    on_bad_image: Literal["fail", "skip"] = setting(
        "fail", "an image that cannot be decoded fails the stage, or is skipped"
    )
    workers: int = setting(0, "processes; 0 = one per CPU core", "[0, 1024]", output=False)
    shard_size: int = setting(1000, "images per TFRecord shard", SHARD)
    jpeg_quality: int = setting(95, "re-encoding quality of the resized images", "[50, 100]")

    def validate(self, path: str) -> None:
        check_ranges(self, path)


@dataclass(frozen=True)
class AugmentConfig:
    enabled: bool = setting(True, "false: train on the prepared set with class weights")
    target_per_class: int = setting(
        6000, "images per class after balancing (reference: ~6000)", f"[1, {MAX_IMAGES}]"
    )
    scale_to_data: bool = setting(True, "scale the target by train size / 8012 for small data")
    exclude: tuple[str, ...] = setting(("nv",), "classes left as they are", choices=CLASSES)
    seed: int = setting(0, "seed of the variants", SEED)
    flip: bool = setting(True, "random horizontal and vertical flips")
    rotation_deg: float = setting(20.0, "largest rotation, in degrees either way", "[0, 180]")
    shift: float = setting(0.1, "largest shift, a fraction of the image side", "[0, 0.5)")
    zoom: float = setting(0.1, "largest zoom in or out, a fraction", "[0, 0.5)")
    shard_size: int = setting(1000, "images per TFRecord shard", SHARD)

    def validate(self, path: str) -> None:
        check_ranges(self, path)
        for name in self.exclude:
            _check(name in CLASSES, f"{path}exclude", f"unknown class '{name}'")


@dataclass(frozen=True)
class TrainConfig:
    backbone: str = setting("resnet152", "the keras.applications base", choices=tuple(BACKBONES))
    weights: str = setting(
        "imagenet", "imagenet, none (random) or the store URI of a .weights.h5 file of the base"
    )
    batch_size: int = setting(32, "images per training step", "[1, 4096]")
    top_epochs: int = setting(10, "epochs of the head alone", EPOCHS, output=TOP)
    top_learning_rate: float = setting(
        0.001, "RMSprop learning rate of the head, as the reference", "> 0", output=TOP
    )
    finetune_epochs: int = setting(
        100, "epochs of fine-tuning; 0 = no finetune stage", f"[0, {MAX_EPOCHS}]", output=FINETUNE
    )
    finetune_learning_rate: float = setting(
        0.0001, "Adam learning rate of fine-tuning; the reference used 0.01", "> 0", output=FINETUNE
    )
    finetune_block: str = setting(
        "", "layer-name prefix to unfreeze; empty = the backbone's last block", output=FINETUNE
    )
    patience_loss: int = setting(3, "EarlyStopping patience on val_loss", EPOCHS)
    patience_accuracy: int = setting(10, "EarlyStopping patience on val_accuracy", EPOCHS)
    class_weights: Literal["auto", "balanced", "none"] = setting(
        "auto", "auto: balanced when augment is off"
    )
    dense_units: int = setting(1000, "units of the head's dense layer", "[1, 65536]")
    dropout: float = setting(0.25, "dropout rate of the head", "[0, 1)")
    mixed_precision: Literal["auto", "on", "off"] = setting(
        "auto",
        "auto: on when a GPU is visible; bfloat16 where every GPU has it (compute capability"
        " >= 8.0) and on CPUs, else float16 with loss scaling",
    )
    xla: Literal["auto", "on", "off"] = setting(
        "auto", "XLA compilation of the training step; auto: on with one GPU", output=False
    )
    seed: int = setting(0, "seed of weights and shuffling", SEED)
    steps_per_epoch: int = setting(
        0, "steps per epoch; 0 = one pass over the training data", f"[0, {MAX_IMAGES}]"
    )
    cache_features: bool = setting(
        True,
        "compute the frozen layers once per image and train only the rest (phase top: the "
        "pooled features, kept in the stage's output; fine-tune: the output of the block "
        "before the trainable one); where a layer before them changes in training the "
        "stage takes the full path and logs why",
    )
    lr_schedule: Literal["constant", "cosine"] = setting(
        "constant", "learning rate over a phase: constant (the reference) or cosine decay to 1/10"
    )

    def validate(self, path: str) -> None:
        check_ranges(self, path)
        w = self.weights
        _check(
            w in ("imagenet", "none") or "://" in w,
            f"{path}weights",
            "must be 'imagenet', 'none' or a store URI of a .weights.h5 file",
        )
        _check(
            w in ("imagenet", "none") or w.endswith(".weights.h5"),
            f"{path}weights",
            "a weights URI must end in .weights.h5",
        )


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int = setting(64, "images per prediction step", "[1, 4096]")
    ece_bins: int = setting(15, "bins of the expected calibration error", "[2, 100]")

    def validate(self, path: str) -> None:
        check_ranges(self, path)


@dataclass(frozen=True)
class PromoteConfig:
    metric: Literal["balanced_accuracy", "macro_f1", "roc_auc_macro"] = setting(
        "balanced_accuracy", "the metric a candidate is compared on"
    )
    min_improvement: float = setting(
        0.0,
        "the lower bound of the 95% paired bootstrap interval of the candidate's gain over "
        "the champion (same validation images) must exceed this",
        ">= 0",
    )
    melanoma_recall_margin: float = setting(
        0.02, "largest allowed drop in melanoma recall", "[0, 1]"
    )
    require_no_drift: bool = setting(
        False,
        "hold the promotion for review when prepare's data report flags drift in any class "
        "against the champion's training data, or could not check it",
    )
    serving_export: bool = setting(
        True,
        "write each registered version's TensorFlow SavedModel under models/serving/<n> "
        "(the TF Serving and KServe layout)",
        output=False,
    )

    def validate(self, path: str) -> None:
        check_ranges(self, path)


@dataclass(frozen=True)
class PipelineConfig:
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)
    retries: int = setting(
        2, "extra attempts per stage on failure (bad input is never retried)", "[0, 10]"
    )
    synthetic_images: int = setting(
        1500,
        "size of the synthetic set when no raw data is given: from the generator's minimum"
        f" (two lesions per class) to {MAX_IMAGES}",
    )

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            if dataclasses.is_dataclass(section := getattr(self, f.name)):
                section.validate(f"{f.name}.")  # type: ignore[union-attr]
        check_ranges(self)
        from skinlesion.synthetic import MIN_IMAGES  # the generator's own lower bound

        _check(
            MIN_IMAGES <= self.synthetic_images <= MAX_IMAGES,
            "synthetic_images",
            f"must be in [{MIN_IMAGES}, {MAX_IMAGES}], got {self.synthetic_images}",
        )


# Named presets: partial mappings applied over the defaults.
PRESETS: dict[str, dict[str, Any]] = {
    # The published reference procedure (README), for reproduction (leaky image-level split).
    "reference": {
        "prepare": {"split": "seed", "seed": 101},
        "train": {"finetune_learning_rate": 0.01},
    },
    # Recommended for real data: lesion-grouped split, ResNet152, low fine-tune LR.
    "default": {},
    # One CPU machine, synthetic data: what `make run` uses (minutes on 2 cores).
    "cpu": {
        "prepare": {"image_size": 96},
        "augment": {"target_per_class": 6000},
        # From scratch (no ImageNet download): cosine decay steadies the noisy val figures,
        # patience 5 on val_loss lets it finish; 10 + 2 epochs of ~6k images at 96 px.
        "train": {
            "backbone": "mobilenetv3small",
            "weights": "none",
            "batch_size": 32,
            "top_epochs": 10,
            "top_learning_rate": 0.002,
            "lr_schedule": "cosine",
            "patience_loss": 5,
            "finetune_epochs": 2,
            "finetune_learning_rate": 0.0002,
        },
        "synthetic_images": 1500,
    },
    # Seconds, for tests.
    "tiny": {
        "prepare": {"image_size": 64, "shard_size": 64},
        "augment": {"target_per_class": 60, "scale_to_data": False, "shard_size": 64},
        "train": {
            "backbone": "mobilenetv3small",
            "weights": "none",
            "batch_size": 16,
            "top_epochs": 2,
            "finetune_epochs": 1,
            "dense_units": 32,
        },
        "evaluate": {"batch_size": 32},
        "retries": 1,
        "synthetic_images": 140,
    },
}


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(name, message)


def load_pipeline(
    preset: str = "default", path: str | Path | None = None, overrides: list[str] | None = None
) -> PipelineConfig:
    """Defaults -> preset -> YAML file -> overrides, validated."""
    if preset not in PRESETS:
        raise ConfigError("preset", f"unknown preset '{preset}' (known: {', '.join(PRESETS)})")
    cfg = build(PipelineConfig, PRESETS[preset])
    if path is not None:
        cfg = build(PipelineConfig, read_yaml(path), cfg)
    if overrides:
        cfg = build(PipelineConfig, parse_overrides(overrides), cfg)
    cfg.validate()
    return cfg


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A `--config` file: a YAML mapping (empty file: no changes)."""
    data = userinput.read_yaml(path, "--config")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"--config {path}: top level must be a mapping")
    return data


def section_from_args(cls: type[C], args: argparse.Namespace, section: str) -> C:
    """Defaults -> `--config` file (its `section` part, or the whole file) -> flags."""
    cfg = cls()
    path = getattr(args, "config", None)
    if path:
        data = read_yaml(path)
        pipeline_keys = {f.name for f in dataclasses.fields(PipelineConfig)}
        if set(data) & pipeline_keys:  # a pipeline file: its section, possibly absent
            data = data.get(section) or {}
        cfg = build(cls, data, cfg, f"{section}.")
    flags = {
        f.name: getattr(args, f"cfg_{f.name}")
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if getattr(args, f"cfg_{f.name}", None) is not None
    }
    cfg = build(cls, flags, cfg, f"{section}.")
    cfg.validate(f"{section}.")  # type: ignore[attr-defined]
    return cfg


# --- which settings change a stage's output (its fingerprint) ----------------------------


def stage_settings(stage: str, section: Any) -> dict[str, Any]:
    """The settings that go into a stage's fingerprint (fields that change its output)."""
    values = to_dict(section)
    return {f.name: values[f.name] for f in dataclasses.fields(section) if changes_output(f, stage)}
