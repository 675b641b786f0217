"""Typed configuration: frozen dataclasses loaded once and validated.

Order of precedence: dataclass defaults -> named preset -> YAML file -> CLI
flags. Every error names the offending field (`train.batch_size`). The
resolved config is saved next to each stage's outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from skinlesion import userinput
from skinlesion.classes import CLASSES
from skinlesion.errors import ConfigError, InputError

BACKBONES = ("resnet152", "resnet50", "efficientnetb0", "mobilenetv3small")
# Every int field has a range. Seeds go to numpy, which takes 0 .. 2**32 - 1.
SEED_MAX = 2**32 - 1
MAX_EPOCHS = 10_000
MAX_SHARD = 1_000_000
MAX_IMAGES = 10_000_000


@dataclass(frozen=True)
class PrepareConfig:
    split: Literal["lesion", "seed"] = "lesion"  # lesion-grouped (default) or the reference
    val_fraction: float = 0.2
    seed: int = 101
    image_size: int = 224
    resize: Literal["squash", "crop"] = "squash"  # squash = plain resize, crop = centre crop
    on_bad_image: Literal["fail", "skip"] = "fail"
    workers: int = 0  # 0 = one per CPU core
    shard_size: int = 1000  # images per TFRecord shard
    jpeg_quality: int = 95  # re-encoding quality of the resized images

    def validate(self) -> None:
        _check(0.0 < self.val_fraction < 1.0, "prepare.val_fraction", "must be in (0, 1)")
        _in_range(self.seed, 0, SEED_MAX, "prepare.seed")
        _in_range(self.image_size, 32, 1024, "prepare.image_size")
        _in_range(self.workers, 0, 1024, "prepare.workers")
        _in_range(self.shard_size, 1, MAX_SHARD, "prepare.shard_size")
        _in_range(self.jpeg_quality, 50, 100, "prepare.jpeg_quality")


@dataclass(frozen=True)
class AugmentConfig:
    enabled: bool = True  # false: train on the prepared set with class weights
    target_per_class: int = 6000  # images per class after balancing (reference: ~6000)
    scale_to_data: bool = True  # scale the target by train size / 8012 for small data
    exclude: tuple[str, ...] = ("nv",)  # classes left as they are
    seed: int = 0
    flip: bool = True
    rotation_deg: float = 20.0
    shift: float = 0.1  # fraction of the image side
    zoom: float = 0.1  # +/- fraction
    shard_size: int = 1000

    def validate(self) -> None:
        _in_range(self.target_per_class, 1, MAX_IMAGES, "augment.target_per_class")
        _in_range(self.seed, 0, SEED_MAX, "augment.seed")
        for name in self.exclude:
            _check(name in CLASSES, "augment.exclude", f"unknown class '{name}'")
        _check(0 <= self.rotation_deg <= 180, "augment.rotation_deg", "must be in [0, 180]")
        _check(0 <= self.shift < 0.5, "augment.shift", "must be in [0, 0.5)")
        _check(0 <= self.zoom < 0.5, "augment.zoom", "must be in [0, 0.5)")
        _in_range(self.shard_size, 1, MAX_SHARD, "augment.shard_size")


@dataclass(frozen=True)
class TrainConfig:
    backbone: Literal["resnet152", "resnet50", "efficientnetb0", "mobilenetv3small"] = "resnet152"
    weights: str = "imagenet"  # imagenet | none | store URI of a .weights.h5 file
    batch_size: int = 32
    top_epochs: int = 10
    top_learning_rate: float = 0.001  # rmsprop, as the reference
    finetune_epochs: int = 100
    finetune_learning_rate: float = 0.0001  # Adam; the reference used 0.01
    finetune_block: str = ""  # layer-name prefix to unfreeze; "" = the backbone's last block
    patience_loss: int = 3  # EarlyStopping(val_loss)
    patience_accuracy: int = 10  # EarlyStopping(val_accuracy)
    class_weights: Literal["auto", "balanced", "none"] = "auto"  # auto: balanced if no augment
    dense_units: int = 1000
    dropout: float = 0.25
    mixed_precision: Literal["auto", "on", "off"] = "auto"  # auto: on when a GPU is visible
    seed: int = 0
    steps_per_epoch: int = 0  # 0 = one pass over the training data
    # Learning rate over a phase's epochs: constant (the reference) or cosine decay to 1/10.
    lr_schedule: Literal["constant", "cosine"] = "constant"

    def validate(self) -> None:
        w = self.weights
        _check(
            w in ("imagenet", "none") or "://" in w,
            "train.weights",
            "must be 'imagenet', 'none' or a store URI of a .weights.h5 file",
        )
        _check(
            w in ("imagenet", "none") or w.endswith(".weights.h5"),
            "train.weights",
            "a weights URI must end in .weights.h5",
        )
        _in_range(self.batch_size, 1, 4096, "train.batch_size")
        _in_range(self.top_epochs, 1, MAX_EPOCHS, "train.top_epochs")
        _in_range(self.finetune_epochs, 0, MAX_EPOCHS, "train.finetune_epochs")
        _check(self.top_learning_rate > 0, "train.top_learning_rate", "must be > 0")
        _check(self.finetune_learning_rate > 0, "train.finetune_learning_rate", "must be > 0")
        _in_range(self.patience_loss, 1, MAX_EPOCHS, "train.patience_loss")
        _in_range(self.patience_accuracy, 1, MAX_EPOCHS, "train.patience_accuracy")
        _in_range(self.dense_units, 1, 65536, "train.dense_units")
        _check(0 <= self.dropout < 1, "train.dropout", "must be in [0, 1)")
        _in_range(self.seed, 0, SEED_MAX, "train.seed")
        _in_range(self.steps_per_epoch, 0, MAX_IMAGES, "train.steps_per_epoch")


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int = 64
    ece_bins: int = 15

    def validate(self) -> None:
        _in_range(self.batch_size, 1, 4096, "evaluate.batch_size")
        _in_range(self.ece_bins, 2, 100, "evaluate.ece_bins")


@dataclass(frozen=True)
class PromoteConfig:
    metric: Literal["balanced_accuracy", "macro_f1", "roc_auc_macro"] = "balanced_accuracy"
    min_improvement: float = 0.0  # candidate must beat the champion by more than this
    melanoma_recall_margin: float = 0.02  # largest allowed drop in melanoma recall

    def validate(self) -> None:
        _check(self.min_improvement >= 0, "promote.min_improvement", "must be >= 0")
        _check(0 <= self.melanoma_recall_margin <= 1, "promote.melanoma_recall_margin", "in [0, 1]")


@dataclass(frozen=True)
class PipelineConfig:
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)
    retries: int = 2  # extra attempts per stage on failure (bad input is never retried)
    synthetic_images: int = 1500  # size of the synthetic set when no raw data is given

    def validate(self) -> None:
        for section in (self.prepare, self.augment, self.train, self.evaluate, self.promote):
            section.validate()
        _in_range(self.retries, 0, 10, "retries")
        from skinlesion.synthetic import MIN_IMAGES  # the generator's own lower bound

        _in_range(self.synthetic_images, MIN_IMAGES, MAX_IMAGES, "synthetic_images")


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

C = TypeVar("C")
_YAML_TRUE = ("on", "yes", "true")
_YAML_FALSE = ("off", "no", "false")


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(name, message)


def _in_range(value: int, low: int, high: int, name: str) -> None:
    _check(low <= value <= high, name, f"must be in [{low}, {high}], got {value}")


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or fail naming the field."""
    origin = get_origin(hint)
    if origin is Literal:
        choices = get_args(hint)
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no/true/false as booleans
            words = _YAML_TRUE if value else _YAML_FALSE
            named = [c for c in choices if isinstance(c, str) and c.lower() in words]
            value = named[0] if len(named) == 1 else value
        if value not in choices:
            raise ConfigError(name, f"must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in (p.strip() for p in value.split(",")) if v]
        if not isinstance(value, list | tuple):
            raise ConfigError(name, f"must be a list, got {value!r}")
        return tuple(_coerce(v, get_args(hint)[0], name) for v in value)
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(name, "union types are not supported in config")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(name, f"must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(name, f"must be an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(name, f"must be an integer, got {value!r}") from None
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(name, f"must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(name, f"must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(name, f"must be a finite number, got {value!r}")
        return number
    if hint is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(name, f"must be a string, got {value!r}")
        return str(value)
    raise ConfigError(name, f"unsupported type {hint!r}")


def build(
    cls: type[C], values: Mapping[str, Any] | None, base: C | None = None, path: str = ""
) -> C:
    """Build a (nested) config dataclass from a mapping over `base` (or the defaults)."""
    values = values or {}
    if not isinstance(values, Mapping):
        raise ConfigError(path.rstrip(".") or "<root>", f"must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in values:
        if key not in fields:
            name = f"{path}{key}"
            raise ConfigError(name, f"unknown field (known: {', '.join(sorted(fields))})")
    current = base if base is not None else cls()
    changes: dict[str, Any] = {}
    for key, value in values.items():
        hint = hints[key]
        name = f"{path}{key}"
        if dataclasses.is_dataclass(hint):
            changes[key] = build(hint, value, getattr(current, key), f"{name}.")  # type: ignore[arg-type]
        else:
            changes[key] = _coerce(value, hint, name)
    return dataclasses.replace(current, **changes)  # type: ignore[type-var]


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, JSON/YAML-friendly dict (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`train.batch_size=16` pairs to a nested mapping (values parsed as YAML scalars)."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(pair, "override must look like section.field=value")
        dotted, raw = pair.split("=", 1)
        node = tree
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):  # "train=1" and then "train.batch_size=2"
                raise ConfigError(dotted.strip(), f"'{part}' was already given a value")
        node[parts[-1]] = userinput.parse_yaml(raw, f"--set {pair}") if raw else ""
    return tree


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


# --- CLI flags for one stage section -----------------------------------------------------


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One `--field-name` flag per field of a flat config dataclass (values stay strings)."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} (override the config file)")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        hint = hints[f.name]
        extra = ""
        if get_origin(hint) is Literal:
            extra = " {" + ",".join(map(str, get_args(hint))) + "}"
        default = getattr(cls(), f.name)
        group.add_argument(
            flag_name(f.name),
            dest=f"cfg_{f.name}",
            default=None,
            metavar="VALUE",
            help=f"{hint.__name__ if isinstance(hint, type) else 'choice'}{extra}; "
            f"default {default!r}",
        )


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
    cfg.validate()  # type: ignore[attr-defined]
    return cfg


def to_flags(cfg: Any) -> list[str]:
    """The inverse of `add_flags`: a section as CLI flags (used to build stage commands)."""
    argv: list[str] = []
    for key, value in to_dict(cfg).items():
        if isinstance(value, list):
            value = ",".join(map(str, value))
        elif isinstance(value, bool):
            value = "true" if value else "false"
        argv += [flag_name(key), str(value)]
    return argv


# --- which settings change a stage's output (its fingerprint) ----------------------------

_NOT_OUTPUT_AFFECTING = {"prepare": ("workers",)}


def stage_settings(stage: str, section: Any) -> dict[str, Any]:
    """The settings that go into a stage's fingerprint (fields that change its output)."""
    values = to_dict(section)
    for name in _NOT_OUTPUT_AFFECTING.get(stage, ()):
        values.pop(name, None)
    if stage == "train":
        values = {k: v for k, v in values.items() if not k.startswith("finetune_")}
    elif stage == "finetune":
        values = {k: v for k, v in values.items() if not k.startswith("top_")}
    return values
