"""Augment stage: balance counts, originals kept, reproducibility, streaming, transforms."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import inspect
import io
import itertools
import json
import re
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from skinlesion import augment, cli, pipeline, shards
from skinlesion.augment import Params, apply_params
from skinlesion.classes import CLASSES, INDEX
from skinlesion.config import AugmentConfig, PipelineConfig
from skinlesion.errors import DataError, InputError
from skinlesion.layout import RunLayout
from skinlesion.manifest import commit_stage
from skinlesion.results import PrepareResult
from skinlesion.storage import FileStore, S3Store, open_store
from tests.stage_results import prepare_result

SIZE = 48
# Train images per class of the hand-built prepared set: bkl is above the target (kept as
# is), df has a single image (every variant comes from it), nv is excluded.
TRAIN = {"akiec": 3, "bcc": 4, "bkl": 25, "df": 1, "mel": 6, "nv": 30, "vasc": 2}
VAL = {"akiec": 1, "bcc": 1, "bkl": 2, "df": 1, "mel": 2, "nv": 5, "vasc": 1}
TARGET = 20
CFG = AugmentConfig(target_per_class=TARGET, scale_to_data=False, shard_size=16, seed=0)


# --- fixtures -----------------------------------------------------------------------------


def _lesion_jpeg(label: int, rng: np.random.Generator, size: int = SIZE) -> bytes:
    """A skin-coloured square with a class-coloured ellipse, an off-centre hair and noise."""
    skin = np.clip(np.array([205, 160, 140]) + rng.normal(0, 8, 3), 0, 255).astype(np.uint8)
    im = Image.fromarray(np.full((size, size, 3), skin, np.uint8))
    draw = ImageDraw.Draw(im)
    colour = tuple(int(v) for v in rng.integers(20, 200, 3))
    cx, cy = rng.uniform(0.35, 0.65, 2) * size
    rx, ry = rng.uniform(0.15, 0.3, 2) * size
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=colour)
    draw.line([0, 0, size, size // 3], fill=(80, 60, 50), width=2)
    noisy = np.asarray(im).astype(int) + rng.normal(0, 6, (size, size, 3)).astype(int)
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _write_prepared(store: FileStore) -> dict[str, Any]:
    """A committed prepare-like output: train and val shards in several files."""
    rng = np.random.default_rng(7)

    def body(work: Path) -> PrepareResult:
        out: dict[str, Any] = {}
        counter = itertools.count()
        for split, counts in (("train", TRAIN), ("val", VAL)):
            with shards.ShardWriter(work, split, 16) as writer:
                # Class-sorted on purpose: the output must still interleave the classes.
                for name, n in counts.items():
                    for _ in range(n):
                        i = next(counter)
                        writer.write(
                            shards.Example(
                                _lesion_jpeg(INDEX[name], rng),
                                INDEX[name],
                                f"ISIC_{i:07d}",
                                f"HAM_{i // 2:07d}",
                            )
                        )
            out[split] = writer.close()
        return prepare_result(out, SIZE)

    return commit_stage("prepare", store, {"jpeg_quality": 95}, {}, body)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One prepared set, augmented three times: seed 0, seed 0 again by the CLI, seed 1."""
    root = tmp_path_factory.mktemp("augment")
    layout = RunLayout(root.as_uri(), "r1")
    prepared = open_store(layout.stage_uri("prepare"))
    assert isinstance(prepared, FileStore)
    _write_prepared(prepared)
    out_a = open_store(layout.stage_uri("augment"))
    manifest_a = augment.run_augment(CFG, prepared, out_a)
    out_b = open_store(f"{root.as_uri()}/same-seed")
    argv = ["augment", "--prepared", prepared.uri, "--out", out_b.uri, "--seed", "0"]
    argv += ["--target-per-class", str(TARGET), "--scale-to-data", "false", "--shard-size", "16"]
    assert cli.main(argv) == 0  # the CLI path (Jobs, pipeline) resolves the same settings
    out_c = open_store(f"{root.as_uri()}/other-seed")
    manifest_c = augment.run_augment(dataclasses.replace(CFG, seed=1), prepared, out_c)
    return {
        "layout": layout,
        "prepared": prepared,
        "out": out_a,
        "manifest": manifest_a,
        "manifest_same": json.loads(out_b.get_bytes("manifest.json")),
        "manifest_other": manifest_c,
    }


def _examples(store: Any, manifest: dict[str, Any], split: str, dest: Path) -> list[Any]:
    paths = []
    for shard in manifest["shards"][split]:
        store.get_file(shard["file"], dest / shard["file"])
        paths.append(dest / shard["file"])
    return list(shards.iter_examples(paths))


@pytest.fixture(scope="module")
def outputs(run: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    dest = tmp_path_factory.mktemp("read")
    prep = json.loads(run["prepared"].get_bytes("manifest.json"))
    return {
        "train": _examples(run["prepared"], prep, "train", dest / "train"),
        "val": _examples(run["prepared"], prep, "val", dest / "val"),
        "out": _examples(run["out"], run["manifest"], "train", dest / "out"),
    }


def _expected_totals(before: dict[str, int], cfg: AugmentConfig, target: int) -> dict[str, int]:
    return {c: n if c in cfg.exclude or n == 0 else max(n, target) for c, n in before.items()}


# --- the stage end to end -----------------------------------------------------------------


def test_balances_every_class_to_the_target_except_excluded(run: dict, outputs: dict) -> None:
    before = collections.Counter(CLASSES[ex.label] for ex in outputs["train"])
    after = collections.Counter(CLASSES[ex.label] for ex in outputs["out"])
    expected = _expected_totals({c: before[c] for c in CLASSES}, CFG, TARGET)
    assert expected == {**TRAIN, "akiec": 20, "bcc": 20, "df": 20, "mel": 20, "vasc": 20}
    assert {c: after[c] for c in CLASSES} == expected
    assert after["nv"] == TRAIN["nv"]  # excluded: unchanged
    assert after["bkl"] == TRAIN["bkl"]  # above the target: no variants, no loss
    manifest = run["manifest"]
    assert manifest["counts"]["before"] == TRAIN
    assert manifest["counts"]["after"] == expected
    assert manifest["target"] == TARGET
    assert manifest["n_images"] == len(outputs["out"]) == sum(expected.values())
    assert sum(s["count"] for s in manifest["shards"]["train"]) == manifest["n_images"]
    assert all(s["count"] <= CFG.shard_size for s in manifest["shards"]["train"])


def test_originals_are_kept_byte_for_byte_and_val_is_not_copied(outputs: dict) -> None:
    out = {ex.image_id: ex for ex in outputs["out"]}
    for ex in outputs["train"]:
        assert out[ex.image_id] == ex  # jpeg bytes, label, lesion id unchanged
    val_ids = {ex.image_id for ex in outputs["val"]}
    assert not any(i.split("_aug")[0] in val_ids for i in out)


def test_variants_name_their_source_and_keep_its_lesion_label_and_shape(outputs: dict) -> None:
    sources = {ex.image_id: ex for ex in outputs["train"]}
    variants = [ex for ex in outputs["out"] if ex.image_id not in sources]
    assert len(variants) == len(outputs["out"]) - len(outputs["train"])
    per_source: collections.Counter[str] = collections.Counter()
    for ex in variants:
        m = re.fullmatch(r"(.+)_aug(\d{4})", ex.image_id)
        assert m, ex.image_id
        src = sources[m.group(1)]
        per_source[src.image_id] += 1
        assert (ex.label, ex.lesion_id) == (src.label, src.lesion_id)
        assert ex.jpeg != src.jpeg
        image, original = augment.decode_jpeg(ex.jpeg), augment.decode_jpeg(src.jpeg)
        assert image.shape == original.shape and image.dtype == np.uint8
    # Round-robin: within a class the variants spread evenly over the sources.
    for name in ("akiec", "bcc", "mel", "vasc"):
        counts = [per_source[ex.image_id] for ex in outputs["train"] if CLASSES[ex.label] == name]
        assert max(counts) - min(counts) <= 1, (name, counts)
    df_source = next(ex.image_id for ex in outputs["train"] if CLASSES[ex.label] == "df")
    assert per_source[df_source] == TARGET - 1


def test_output_interleaves_classes(run: dict, outputs: dict) -> None:
    # The input is sorted by class; every output shard must still mix the classes.
    labels = [ex.label for ex in outputs["out"]]
    for start in range(0, len(labels), CFG.shard_size):
        assert len(set(labels[start : start + CFG.shard_size])) >= 4


def test_manifest_and_files(run: dict) -> None:
    manifest, out = run["manifest"], run["out"]
    assert set(manifest["shards"]) == {"train"}
    assert manifest["image_size"] == SIZE and manifest["synthetic"] is True
    files = manifest["files"]
    for name in ("class_balance.png", "augment_samples.png", "config.json"):
        assert name in files and out.exists(name)
    for shard in manifest["shards"]["train"]:
        assert shard["file"] in files
    for name in ("class_balance.png", "augment_samples.png"):
        assert out.get_bytes(name)[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(out.get_bytes("config.json"))["target_per_class"] == TARGET


def test_same_seed_gives_identical_shards_other_seed_differs(run: dict) -> None:
    a = run["manifest"]
    b = run["manifest_same"]
    c = run["manifest_other"]
    shard_files = [s["file"] for s in a["shards"]["train"]]
    assert len(shard_files) > 1
    assert b["fingerprint"] == a["fingerprint"]
    assert b["files"] == a["files"]  # every output file, figures included, byte-identical
    assert b["counts"] == a["counts"]
    assert c["counts"] == a["counts"]
    assert [c["files"][f]["sha256"] for f in shard_files] != [
        a["files"][f]["sha256"] for f in shard_files
    ]


def test_s3_input_and_output_give_the_same_files(run: dict, s3_store: S3Store) -> None:
    prepared = s3_store.child("prepare")
    for obj in run["prepared"].list():
        prepared.put_bytes(obj.key, run["prepared"].get_bytes(obj.key))
    manifest = augment.run_augment(CFG, prepared, s3_store.child("augment"))
    assert manifest["inputs"] == run["manifest"]["inputs"]
    assert manifest["files"] == run["manifest"]["files"]
    assert s3_store.child("augment").exists("manifest.json")


def test_fingerprint_matches_the_pipeline_and_rerun_is_skipped(run: dict) -> None:
    layout = run["layout"]
    cfg = PipelineConfig(augment=CFG)
    call = next(c for c in pipeline.plan(cfg, layout) if c.stage.name == "augment")
    assert call.out_uri == run["out"].uri
    assert pipeline.expected_fingerprint(call) == run["manifest"]["fingerprint"]
    again = augment.run_augment(CFG, run["prepared"], run["out"])
    assert again["created_at"] == run["manifest"]["created_at"]  # skipped, not redone


def test_missing_prepare_output_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="run its stage first"):
        augment.run_augment(CFG, FileStore(tmp_path / "nothing"), FileStore(tmp_path / "out"))


def test_truncated_shard_is_a_data_error(run: dict, tmp_path: Path) -> None:
    name = run["manifest"]["shards"]["train"][0]["file"]
    data = run["out"].get_bytes(name)
    path = tmp_path / name
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(DataError, match="truncated"):
        augment.SourceIndex([path])


def test_corrupt_or_mislabelled_shards_are_data_errors(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    with shards.ShardWriter(tmp_path / "bad", "train", 10) as writer:
        writer.write(shards.Example(_lesion_jpeg(0, rng), 9, "ISIC_1", "HAM_1"))
    with pytest.raises(DataError, match="bad label 9"):
        augment.SourceIndex([tmp_path / "bad" / "train-00000.tfrecord"])
    with shards.ShardWriter(tmp_path / "flip", "train", 10) as writer:
        writer.write(shards.Example(_lesion_jpeg(0, rng), 0, "ISIC_1", "HAM_1"))
    path = tmp_path / "flip" / "train-00000.tfrecord"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the JPEG bytes: only the record CRC notices
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="unreadable shard"):
        augment.SourceIndex([path])


# --- targets and the plan ------------------------------------------------------------------


def test_effective_target_scales_with_train_size() -> None:
    cfg = AugmentConfig()
    assert augment.effective_target(cfg, 8012) == 6000
    assert augment.effective_target(cfg, 801) == round(6000 * 801 / 8012)
    assert augment.effective_target(cfg, 1) == 1
    assert augment.effective_target(dataclasses.replace(cfg, scale_to_data=False), 801) == 6000


def test_class_totals_never_shrink_a_class() -> None:
    cfg = AugmentConfig(exclude=("nv", "vasc"))
    before = {"akiec": 5, "bcc": 50, "bkl": 0, "df": 1, "mel": 9, "nv": 3, "vasc": 2}
    assert augment.class_totals(cfg, before, 10) == {
        "akiec": 10,
        "bcc": 50,
        "bkl": 0,
        "df": 10,
        "mel": 10,
        "nv": 3,
        "vasc": 2,
    }


def test_plan_counts_round_robin_and_proportional_interleave() -> None:
    sources, totals = [3, 4, 25, 1, 6, 30, 2], [20, 20, 25, 20, 20, 30, 20]
    items = list(augment.plan(sources, totals))
    assert len(items) == sum(totals)
    for label in range(7):
        mine = [(s, r) for lab, s, r in items if lab == label]
        n = sources[label]
        assert mine == [(i % n, i // n) for i in range(totals[label])]
    total = sum(totals)
    seen = collections.Counter[int]()
    for k, (label, _, _) in enumerate(items, start=1):
        seen[label] += 1
        for lab in range(7):
            assert abs(seen[lab] - k * totals[lab] / total) <= 1.5, (k, lab)


def test_plan_is_lazy_and_memory_does_not_grow_with_the_target() -> None:
    huge = [10**12] * 7
    first = list(itertools.islice(augment.plan([1] * 7, huge), 1000))  # instant: lazy
    assert {lab for lab, _, _ in first} == set(range(7))
    tracemalloc.start()
    for _ in itertools.islice(augment.plan([5] * 7, huge), 200_000):
        pass
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1_000_000, peak  # bytes: nothing accumulates per output example
    assert inspect.isgeneratorfunction(augment.generate)


# --- transforms ---------------------------------------------------------------------------


def _image(h: int = 40, w: int = 56, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_identity_and_flips_are_exact() -> None:
    img = _image()
    assert np.array_equal(apply_params(img, Params()), img)
    assert np.array_equal(apply_params(img, Params(flip_h=True)), img[:, ::-1])
    assert np.array_equal(apply_params(img, Params(flip_v=True)), img[::-1])


def test_shift_moves_content_by_the_fraction() -> None:
    img = np.zeros((40, 40, 3), np.uint8)
    img[18:22, 20:24] = 255
    moved = apply_params(img, Params(shift_x=0.25, shift_y=-0.1))  # 10 px right, 4 px up
    ys, xs = np.nonzero(moved[..., 0] > 128)
    assert (xs.min(), xs.max()) == (30, 33)
    assert (ys.min(), ys.max()) == (14, 17)


def test_rotation_is_about_the_centre() -> None:
    img = np.zeros((41, 41, 3), np.uint8)
    img[20, 30] = 255  # 10 px right of the centre
    turned = apply_params(img, Params(angle_deg=90.0))
    y, x = np.unravel_index(np.argmax(turned[..., 0]), turned.shape[:2])
    assert abs(x - 20) <= 1 and abs(y - 20) == 10


@pytest.mark.parametrize("shape", [(48, 48), (30, 70), (64, 20)])
def test_random_transforms_keep_shape_dtype_and_fill_without_black(shape: tuple) -> None:
    cfg = AugmentConfig(rotation_deg=180, shift=0.45, zoom=0.45)
    flat = np.full((*shape, 3), 180, np.uint8)
    img = _image(*shape)
    for v in range(1, 30):
        out = augment.augment_image(img, cfg, "ISIC_1", v)
        assert out.shape == img.shape and out.dtype == np.uint8
        # Reflection fill: a uniform image stays uniform however far it is moved.
        filled = augment.augment_image(flat, cfg, "ISIC_1", v)
        assert filled.min() == 180 and filled.max() == 180


def test_variants_depend_only_on_seed_source_and_number() -> None:
    img = _image()
    first = augment.augment_image(img, CFG, "ISIC_1", 3)
    for v in (1, 2, 5):
        augment.augment_image(img, CFG, "ISIC_2", v)  # other work in between changes nothing
    assert np.array_equal(augment.augment_image(img, CFG, "ISIC_1", 3), first)
    assert not np.array_equal(augment.augment_image(img, CFG, "ISIC_1", 4), first)
    assert not np.array_equal(augment.augment_image(img, CFG, "ISIC_2", 3), first)
    other_seed = dataclasses.replace(CFG, seed=1)
    assert not np.array_equal(augment.augment_image(img, other_seed, "ISIC_1", 3), first)


def test_sampled_parameters_stay_in_their_ranges() -> None:
    cfg = AugmentConfig(rotation_deg=15, shift=0.2, zoom=0.1)
    params = [augment.sample_params(cfg, augment.variant_rng(0, "x", v)) for v in range(400)]
    assert all(abs(p.angle_deg) <= 15 for p in params)
    assert all(0.9 <= p.zoom <= 1.1 for p in params)
    assert all(abs(p.shift_x) <= 0.2 and abs(p.shift_y) <= 0.2 for p in params)
    assert 100 < sum(p.flip_h for p in params) < 300
    assert 100 < sum(p.flip_v for p in params) < 300
    no_flip = dataclasses.replace(cfg, flip=False)
    assert not any(
        augment.sample_params(no_flip, augment.variant_rng(0, "x", v)).flip_h for v in range(50)
    )


def test_jpeg_roundtrip_helpers() -> None:
    img = _image(32, 32)
    data = augment.encode_jpeg(img, 95)
    assert (
        hashlib.sha256(data).hexdigest() == hashlib.sha256(augment.encode_jpeg(img, 95)).hexdigest()
    )
    back = augment.decode_jpeg(data)
    assert back.shape == img.shape and back.dtype == np.uint8


# --- the real path: synthetic HAM10000 tree -> prepare -> augment -------------------------


@pytest.mark.slow
def test_augment_after_prepare_on_synthetic_data(tmp_path: Path) -> None:
    from skinlesion import prepare, synthetic
    from skinlesion.config import load_pipeline

    cfg = load_pipeline("tiny")
    store = FileStore(tmp_path)
    raw, prepared, out = store.child("raw"), store.child("prepare"), store.child("augment")
    synthetic.write_sample_data(raw, images=cfg.synthetic_images, seed=3)
    prep = prepare.run_prepare(cfg.prepare, raw, prepared)
    manifest = augment.run_augment(cfg.augment, prepared, out)

    before = prep["counts"]["train"]
    target = cfg.augment.target_per_class  # the tiny preset does not scale
    assert manifest["counts"]["before"] == before
    assert manifest["counts"]["after"] == _expected_totals(before, cfg.augment, target)
    assert manifest["image_size"] == prep["image_size"] == cfg.prepare.image_size
    assert manifest["synthetic"] is True

    examples = _examples(out, manifest, "train", tmp_path / "read")
    counted = collections.Counter(CLASSES[ex.label] for ex in examples)
    assert {c: counted[c] for c in CLASSES} == manifest["counts"]["after"]
    val = _examples(prepared, prep, "val", tmp_path / "val")
    val_ids = {ex.image_id for ex in val}
    assert not {ex.image_id.split("_aug")[0] for ex in examples} & val_ids
    size = cfg.prepare.image_size
    for ex in examples[:: max(1, len(examples) // 40)]:
        assert augment.decode_jpeg(ex.jpeg).shape == (size, size, 3)
