"""Typed config: presets, precedence, validation that names the field, CLI round trip."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from skinlesion import config
from skinlesion.config import (
    PRESETS,
    AugmentConfig,
    EvaluateConfig,
    PipelineConfig,
    PrepareConfig,
    PromoteConfig,
    TrainConfig,
    build,
    load_pipeline,
    parse_overrides,
    section_from_args,
    to_dict,
)
from skinlesion.errors import ConfigError, InputError
from skinlesion.fields import add_flags, changes_output, field_doc, to_flags
from skinlesion.stages import STAGES

SECTIONS: dict[str, type] = {
    "prepare": PrepareConfig,
    "augment": AugmentConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "promote": PromoteConfig,
}


def write_yaml(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def stage_parser(cls: type) -> argparse.ArgumentParser:
    """What the CLI builds for one stage command."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_flags(parser, cls)
    return parser


# --- presets ------------------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_builds_and_validates(preset: str) -> None:
    cfg = load_pipeline(preset)
    assert isinstance(cfg, PipelineConfig)
    cfg.validate()
    for name, cls in SECTIONS.items():
        assert isinstance(getattr(cfg, name), cls)
    # every value the preset names is the one we get
    for section, values in PRESETS[preset].items():
        if isinstance(values, dict):
            for key, value in values.items():
                got = getattr(getattr(cfg, section), key)
                assert got == (tuple(value) if isinstance(value, list) else value), (section, key)
        else:
            assert getattr(cfg, section) == values


def test_presets_are_what_they_say() -> None:
    assert load_pipeline("default") == PipelineConfig()
    reference = load_pipeline("reference")
    assert (reference.prepare.split, reference.prepare.seed) == ("seed", 101)
    tiny = load_pipeline("tiny")
    assert tiny.train.weights == "none" and tiny.synthetic_images <= 200


def test_unknown_preset() -> None:
    with pytest.raises(ConfigError, match="config field 'preset': unknown preset 'huge'"):
        load_pipeline("huge")


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_resolved_config_reloads_identically(preset: str, tmp_path: Path) -> None:
    """The resolved config saved next to a stage's outputs gives the same config back."""
    cfg = load_pipeline(preset)
    assert build(PipelineConfig, to_dict(cfg)) == cfg
    path = write_yaml(tmp_path / "resolved.yaml", to_dict(cfg))
    assert load_pipeline("default", path) == cfg


# --- precedence ---------------------------------------------------------------------


def test_precedence_defaults_preset_file_overrides(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path / "c.yaml",
        {"train": {"batch_size": 8, "dropout": 0.5}, "prepare": {"resize": "crop"}, "retries": 3},
    )
    cfg = load_pipeline("tiny", path, ["train.batch_size=4", "augment.exclude=nv,mel"])
    assert cfg.train.batch_size == 4  # override beats file beats preset (16)
    assert cfg.train.dropout == 0.5  # file beats default
    assert cfg.train.backbone == "mobilenetv3small"  # preset survives a file not naming it
    assert cfg.prepare.resize == "crop" and cfg.prepare.image_size == 64  # file + preset
    assert cfg.retries == 3
    assert cfg.augment.exclude == ("nv", "mel")
    assert cfg.evaluate.ece_bins == EvaluateConfig().ece_bins  # default
    assert load_pipeline("tiny", path).train.batch_size == 8
    assert load_pipeline("tiny").train.batch_size == 16


def test_yaml_booleans_for_on_off_choices(tmp_path: Path) -> None:
    """YAML 1.1 reads `on`/`off` as booleans; a Literal of 'on'/'off' still accepts them."""
    assert load_pipeline(overrides=["train.mixed_precision=on"]).train.mixed_precision == "on"
    assert load_pipeline(overrides=["train.mixed_precision=off"]).train.mixed_precision == "off"
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: off\n")  # unquoted, as people write it
    assert load_pipeline("default", path).train.mixed_precision == "off"
    with pytest.raises(ConfigError, match=r"train\.class_weights.*got True"):
        load_pipeline(overrides=["train.class_weights=yes"])  # no yes/no choice: still an error


def test_empty_yaml_file_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert load_pipeline("cpu", path) == load_pipeline("cpu")


# --- validation names the field ------------------------------------------------------

BAD_OVERRIDES = [
    # unknown fields / sections
    ("train.batch=4", "train.batch", "unknown field"),
    ("trian.batch_size=4", "trian", "unknown field"),
    ("train.batch_size.x=1", "train.batch_size", "must be"),
    # wrong types
    ("train.batch_size=abc", "train.batch_size", "must be an integer"),
    ("train.batch_size=2.5", "train.batch_size", "must be an integer"),
    ("train.batch_size=true", "train.batch_size", "must be an integer"),
    ("train.dropout=lots", "train.dropout", "must be a number"),
    ("augment.flip=maybe", "augment.flip", "must be true or false"),
    ("augment.exclude={a: 1}", "augment.exclude", "must be a list"),
    ("train.weights=[1]", "train.weights", "must be a string"),
    ("prepare=3", "prepare", "must be a mapping"),
    # bad Literal choices
    ("train.backbone=vgg16", "train.backbone", "must be one of resnet152"),
    ("prepare.split=random", "prepare.split", "must be one of lesion, lesion-hash, seed"),
    ("prepare.resize=stretch", "prepare.resize", "must be one of squash, crop"),
    ("promote.metric=accuracy", "promote.metric", "must be one of"),
    # out of range
    ("train.batch_size=0", "train.batch_size", "must be in [1, 4096]"),
    ("train.batch_size=5000", "train.batch_size", "must be in [1, 4096]"),
    ("prepare.val_fraction=1.0", "prepare.val_fraction", "must be in (0, 1)"),
    ("prepare.val_fraction=0", "prepare.val_fraction", "must be in (0, 1)"),
    ("prepare.image_size=16", "prepare.image_size", "must be in [32, 1024]"),
    ("prepare.jpeg_quality=101", "prepare.jpeg_quality", "must be in [50, 100]"),
    ("prepare.workers=-1", "prepare.workers", "must be in [0, 1024]"),
    ("augment.exclude=nv,xyz", "augment.exclude", "unknown class 'xyz'"),
    ("augment.rotation_deg=181", "augment.rotation_deg", "must be in [0, 180]"),
    ("augment.shift=0.5", "augment.shift", "must be in [0, 0.5)"),
    ("train.dropout=1", "train.dropout", "must be in [0, 1)"),
    ("train.top_learning_rate=0", "train.top_learning_rate", "must be > 0"),
    ("train.top_epochs=0", "train.top_epochs", "must be in [1, 10000]"),
    ("train.weights=imagenet21k", "train.weights", "must be 'imagenet', 'none'"),
    ("train.weights=s3://b/w.h5", "train.weights", "must end in .weights.h5"),
    ("evaluate.ece_bins=1", "evaluate.ece_bins", "must be in [2, 100]"),
    ("promote.min_improvement=-0.1", "promote.min_improvement", "must be >= 0"),
    ("retries=11", "retries", "must be in [0, 10]"),
    ("synthetic_images=10", "synthetic_images", "must be in [70, "),
]


@pytest.mark.parametrize(("override", "field", "message"), BAD_OVERRIDES, ids=lambda v: str(v))
def test_invalid_values_name_the_field(override: str, field: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_pipeline("tiny", overrides=[override])
    assert info.value.field == field
    assert f"config field '{field}'" in str(info.value)
    assert message in str(info.value)
    assert isinstance(info.value, InputError)  # exit code 2, never retried


@pytest.mark.parametrize(("override", "field", "message"), BAD_OVERRIDES, ids=lambda v: str(v))
def test_invalid_values_in_a_file_name_the_field(
    override: str, field: str, message: str, tmp_path: Path
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(parse_overrides([override])))
    with pytest.raises(ConfigError) as info:
        load_pipeline("default", path)
    assert info.value.field == field and message in str(info.value)


def test_good_values_at_the_edges_pass() -> None:
    cfg = load_pipeline(
        overrides=[
            "train.batch_size=1",
            "train.dropout=0",
            "prepare.image_size=32",
            "prepare.val_fraction=0.99",
            "train.weights=s3://bucket/w/resnet.weights.h5",
            "augment.exclude=",
            "train.top_learning_rate=1e-3",
            "train.batch_size=4096",
        ]
    )
    assert cfg.train.batch_size == 4096 and cfg.augment.exclude == ()
    assert cfg.train.top_learning_rate == 0.001


def _int_fields() -> list[str]:
    """Every int field of the pipeline config, dotted (`train.seed`, `retries`)."""
    names = []
    for f in dataclasses.fields(PipelineConfig):
        if f.name in SECTIONS:
            cls = SECTIONS[f.name]
            hints = __import__("typing").get_type_hints(cls)
            names += [f"{f.name}.{g.name}" for g in dataclasses.fields(cls) if hints[g.name] is int]
        elif isinstance(getattr(PipelineConfig(), f.name), int):
            names.append(f.name)
    return names


def test_every_int_field_is_found() -> None:
    assert {"prepare.seed", "augment.seed", "train.seed", "retries"} <= set(_int_fields())


@pytest.mark.parametrize("name", _int_fields())
@pytest.mark.parametrize("value", [-1, 10**12])
def test_every_int_field_has_a_range(name: str, value: int) -> None:
    with pytest.raises(ConfigError) as info:
        load_pipeline("tiny", overrides=[f"{name}={value}"])
    assert info.value.field == name and "must be in [" in str(info.value)
    assert str(value) in str(info.value)  # says what it got


@pytest.mark.parametrize("value", ["nan", "inf", "-.inf"])
def test_floats_must_be_finite(value: str) -> None:
    with pytest.raises(ConfigError, match=r"train\.top_learning_rate.*finite"):
        load_pipeline(overrides=[f"train.top_learning_rate={value}"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"[1, 2]", "top level must be a mapping"),
        (b"a: [", "invalid YAML: expected the node content, but found '<stream end>' at line 1"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "not UTF-8 text"),
        (b"a: 1\x00\x00", "NUL bytes"),
    ],
)
def test_bad_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(InputError) as info:
        load_pipeline("default", path)
    assert str(info.value).startswith(f"--config {path}: ") and message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("make", "message"),
    [(lambda p: p, "is a directory, not a file"), (lambda p: p / "missing.yaml", "no such file")],
)
def test_config_path_that_is_no_file(tmp_path: Path, make: Any, message: str) -> None:
    path = make(tmp_path)
    with pytest.raises(InputError, match=f"^--config {path}: {message}$"):
        load_pipeline("default", path)


def test_override_with_bad_yaml_names_the_flag() -> None:
    with pytest.raises(InputError) as info:
        load_pipeline(overrides=["train.batch_size=[1"])
    assert str(info.value).startswith("--set train.batch_size=[1: invalid YAML")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "pairs", [["train.batch_size"], ["train=1", "train.batch_size=2"]], ids=["no-equals", "clash"]
)
def test_malformed_overrides(pairs: list[str]) -> None:
    with pytest.raises(ConfigError):
        load_pipeline(overrides=pairs)


# --- CLI flags: to_flags -> add_flags -> section_from_args -----------------------------


@pytest.mark.parametrize("section", list(SECTIONS))
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_flags_round_trip(preset: str, section: str) -> None:
    cfg = getattr(load_pipeline(preset), section)
    cls = SECTIONS[section]
    args = stage_parser(cls).parse_args(to_flags(cfg))
    assert section_from_args(cls, args, section) == cfg


@pytest.mark.parametrize("section", list(SECTIONS))
def test_flags_round_trip_of_unusual_values(section: str) -> None:
    """Every field changed away from its default, including empty strings and tuples."""
    cls = SECTIONS[section]
    unusual: dict[str, dict[str, Any]] = {
        "prepare": {"split": "seed", "val_fraction": 1e-05, "resize": "crop", "workers": 3},
        "augment": {"enabled": False, "exclude": (), "rotation_deg": 0.0, "flip": False},
        "train": {"finetune_block": "", "weights": "file:///w/x.weights.h5", "dropout": 0.1},
        "evaluate": {"batch_size": 1, "ece_bins": 2},
        "promote": {"metric": "macro_f1", "melanoma_recall_margin": 1.0},
    }
    cfg = dataclasses.replace(cls(), **unusual[section])
    args = stage_parser(cls).parse_args(to_flags(cfg))
    assert section_from_args(cls, args, section) == cfg


def test_flags_are_validated_and_name_the_field() -> None:
    args = stage_parser(TrainConfig).parse_args(["--batch-size", "0"])
    with pytest.raises(ConfigError, match=r"config field 'train\.batch_size'"):
        section_from_args(TrainConfig, args, "train")
    args = stage_parser(TrainConfig).parse_args(["--backbone", "vgg"])
    with pytest.raises(ConfigError, match=r"config field 'train\.backbone'"):
        section_from_args(TrainConfig, args, "train")


def test_section_config_file_then_flags(tmp_path: Path) -> None:
    """`--config` holds a whole pipeline file or just this stage's section; flags win."""
    pipeline = write_yaml(tmp_path / "p.yaml", {"train": {"batch_size": 8, "dropout": 0.3}})
    section = write_yaml(tmp_path / "s.yaml", {"batch_size": 8, "dropout": 0.3})
    for path in (pipeline, section):
        args = stage_parser(TrainConfig).parse_args(["--config", str(path), "--batch-size", "2"])
        cfg = section_from_args(TrainConfig, args, "train")
        assert (cfg.batch_size, cfg.dropout) == (2, 0.3)
    # A pipeline file without this stage's section leaves the stage at its defaults.
    args = stage_parser(PrepareConfig).parse_args(["--config", str(pipeline)])
    assert section_from_args(PrepareConfig, args, "prepare") == PrepareConfig()
    other = write_yaml(tmp_path / "o.yaml", {"retries": 1})
    args = stage_parser(PrepareConfig).parse_args(["--config", str(other)])
    assert section_from_args(PrepareConfig, args, "prepare") == PrepareConfig()
    # A section file with a typo is still refused, naming the field.
    bad = write_yaml(tmp_path / "b.yaml", {"batch_sise": 8})
    args = stage_parser(TrainConfig).parse_args(["--config", str(bad)])
    with pytest.raises(ConfigError, match=r"config field 'train\.batch_sise'"):
        section_from_args(TrainConfig, args, "train")


def test_every_field_has_a_flag() -> None:
    for cls in SECTIONS.values():
        parser = stage_parser(cls)
        dests = {a.dest for a in parser._actions}
        for f in dataclasses.fields(cls):
            assert f"cfg_{f.name}" in dests
        assert len(to_flags(cls())) == 2 * len(dataclasses.fields(cls))


def test_configs_are_frozen() -> None:
    cfg = load_pipeline("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.batch_size = 1  # type: ignore[misc]
    assert config.to_dict(cfg)["augment"]["exclude"] == ["nv"]  # tuples become lists


# --- which fields feed each stage's fingerprint (config.stage_settings) -------------------

# Pinned: a field joining or leaving this list changes the fingerprints of finished stages.
FINGERPRINT_FIELDS: dict[str, tuple[type, list[str]]] = {
    "prepare": (
        PrepareConfig,
        [
            "split",
            "val_fraction",
            "seed",
            "image_size",
            "resize",
            "on_bad_image",
            "shard_size",
            "jpeg_quality",
        ],
    ),
    "augment": (
        AugmentConfig,
        [
            "enabled",
            "target_per_class",
            "scale_to_data",
            "exclude",
            "seed",
            "flip",
            "rotation_deg",
            "shift",
            "zoom",
            "shard_size",
        ],
    ),
    "train": (
        TrainConfig,
        [
            "backbone",
            "weights",
            "batch_size",
            "top_epochs",
            "top_learning_rate",
            "patience_loss",
            "patience_accuracy",
            "class_weights",
            "dense_units",
            "dropout",
            "mixed_precision",
            "seed",
            "steps_per_epoch",
            "cache_features",
            "lr_schedule",
        ],
    ),
    "finetune": (
        TrainConfig,
        [
            "backbone",
            "weights",
            "batch_size",
            "finetune_epochs",
            "finetune_learning_rate",
            "finetune_block",
            "patience_loss",
            "patience_accuracy",
            "class_weights",
            "dense_units",
            "dropout",
            "mixed_precision",
            "seed",
            "steps_per_epoch",
            "cache_features",
            "lr_schedule",
        ],
    ),
    "evaluate": (EvaluateConfig, ["batch_size", "ece_bins"]),
    "promote": (
        PromoteConfig,
        ["metric", "min_improvement", "melanoma_recall_margin", "require_no_drift"],
    ),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("stage", list(FINGERPRINT_FIELDS))
def test_stage_settings_are_the_pinned_fields(stage: str, preset: str) -> None:
    cls, names = FINGERPRINT_FIELDS[stage]
    section = getattr(load_pipeline(preset), "train" if stage == "finetune" else stage)
    assert isinstance(section, cls)
    values = to_dict(section)
    assert config.stage_settings(stage, section) == {n: values[n] for n in names}


@pytest.mark.parametrize("stage", list(FINGERPRINT_FIELDS))
def test_fingerprint_fields_come_from_the_field_metadata(stage: str) -> None:
    cls, names = FINGERPRINT_FIELDS[stage]
    assert [f.name for f in dataclasses.fields(cls) if changes_output(f, stage)] == names


def test_output_metadata_names_only_stages_that_read_the_section() -> None:
    assert list(FINGERPRINT_FIELDS) == [s.name for s in STAGES]
    for cls in SECTIONS.values():
        readers = {stage for stage, (c, _) in FINGERPRINT_FIELDS.items() if c is cls}
        for f in dataclasses.fields(cls):
            output = f.metadata["output"]
            assert isinstance(output, bool) or set(output) <= readers, (cls.__name__, f.name)


def test_every_field_is_described() -> None:
    classes = [PipelineConfig, *SECTIONS.values()]
    for cls in classes:
        for f in dataclasses.fields(cls):
            assert f.name in SECTIONS or field_doc(f), (cls.__name__, f.name)
