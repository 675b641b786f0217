"""The prepare stage end to end (file and S3 stores), its dry run, bad images, and the
per-image resize it relies on."""

from __future__ import annotations

import io
import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog
from PIL import Image

from skinlesion import cli, ham10000, imaging, prepare
from skinlesion.classes import CLASSES
from skinlesion.config import PrepareConfig, build
from skinlesion.errors import DataError
from skinlesion.manifest import read_result
from skinlesion.results import PrepareResult
from skinlesion.shards import fetch_split, iter_examples
from skinlesion.split import make_split
from skinlesion.storage import FileStore, S3Store, Store
from skinlesion.synthetic import write_sample_data

IMAGES = 70  # the smallest synthetic set: two lesions per class
CFG = PrepareConfig(image_size=64, shard_size=24, workers=1)


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic tree, drawn once for the module; tests copy it before changing it."""
    path = tmp_path_factory.mktemp("raw") / "HAM10000"
    write_sample_data(FileStore(path), images=IMAGES, seed=0)
    return path


@pytest.fixture
def raw(raw_dir: Path, tmp_path: Path) -> FileStore:
    return FileStore(shutil.copytree(raw_dir, tmp_path / "HAM10000"))


def read_split(out: Store, side: str, tmp_path: Path) -> list[Any]:
    _, prepared = read_result(out, PrepareResult, "prepared")
    paths = fetch_split(out, prepared.shards, side, tmp_path / "fetched")
    return list(iter_examples(paths))


def check_output(manifest: dict[str, Any], out: Store, raw: Store, tmp_path: Path) -> None:
    """Shards hold every image once, at the right size and label, as the manifest says."""
    frame = ham10000.load(raw).metadata.set_index("image_id")
    seen: set[str] = set()
    for side in ("train", "val"):
        examples = read_split(out, side, tmp_path / side)
        assert sum(s["count"] for s in manifest["shards"][side]) == len(examples)
        counts = Counter(CLASSES[ex.label] for ex in examples)
        assert manifest["counts"][side] == {c: counts.get(c, 0) for c in CLASSES}
        for ex in examples:
            assert CLASSES[ex.label] == frame.loc[ex.image_id, "dx"]
            assert ex.lesion_id == frame.loc[ex.image_id, "lesion_id"]
            img = Image.open(io.BytesIO(ex.jpeg))
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (64, 64))
        seen |= {ex.image_id for ex in examples}
    assert len(seen) == manifest["n_images"] == IMAGES - len(manifest["skipped"])


# --- the per-image resize ----------------------------------------------------------------


def jpeg(width: int, height: int) -> bytes:
    """A JPEG in three vertical bands: red, green, blue (to see what a crop keeps)."""
    arr = np.zeros((height, width, 3), np.uint8)
    third = width // 3
    arr[:, :third] = (220, 20, 20)
    arr[:, third : 2 * third] = (20, 220, 20)
    arr[:, 2 * third :] = (20, 20, 220)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["squash", "crop"])
def test_resize_gives_the_size_in_both_modes(mode: imaging.Resize) -> None:
    img = imaging.decode_resized(jpeg(600, 450), "x.jpg", 96, mode)
    assert (img.mode, img.size) == ("RGB", (96, 96))
    out = Image.open(io.BytesIO(imaging.resize_jpeg(jpeg(600, 450), "x.jpg", 64, mode, 90)))
    assert (out.format, out.size) == ("JPEG", (64, 64))


def test_crop_keeps_the_centre_square_and_squash_the_whole_frame() -> None:
    data = jpeg(900, 300)  # the centre square is the green band
    squash = np.asarray(imaging.decode_resized(data, "x.jpg", 60, "squash"), np.int32)
    crop = np.asarray(imaging.decode_resized(data, "x.jpg", 60, "crop"), np.int32)
    dominant = lambda arr: set(np.argmax(arr[30, 3:-3], axis=1))  # noqa: E731
    assert {0, 1, 2} <= dominant(squash)
    assert dominant(crop) == {1}


def test_draft_decoding_matches_a_full_decode_closely() -> None:
    data = jpeg(600, 450)
    fast = np.asarray(imaging.decode_resized(data, "x.jpg", 224), np.float32)
    full = Image.open(io.BytesIO(data)).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR)
    assert np.abs(fast - np.asarray(full, np.float32)).mean() < 4


@pytest.mark.parametrize("data", [b"", b"not a jpeg", jpeg(64, 48)[:200]])
def test_undecodable_image_is_a_data_error_naming_the_file(data: bytes) -> None:
    with pytest.raises(DataError, match=r"^HAM10000_images_part_1/ISIC_1\.jpg: cannot decode"):
        imaging.resize_jpeg(data, "HAM10000_images_part_1/ISIC_1.jpg", 64)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({}, None),  # no cgroup files: the affinity mask
        ({"cpu.max": "max 100000\n"}, None),  # v2 without a limit
        ({"cpu.max": "50000 100000\n"}, 1),  # v2: half a CPU still gets one worker
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),
    ],
)
def test_workers_follow_the_cgroup_quota(
    tmp_path: Path, files: dict[str, str], expected: int | None
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    affinity = len(os.sched_getaffinity(0))
    assert imaging.available_cpus(tmp_path) == (expected or affinity)
    assert imaging.resolve_workers(3) == 3
    assert 1 <= imaging.resolve_workers(0) <= affinity


# --- dry run -----------------------------------------------------------------------------


@pytest.fixture
def cli_logging() -> Any:
    """cli.main configures structlog onto pytest's captured stderr: undo it afterwards."""
    yield
    structlog.reset_defaults()


def test_plan_split_reads_the_metadata_only(raw: FileStore) -> None:
    for key in [o.key for o in raw.list(ham10000.PARTS[0])]:
        raw.delete(key)  # no image is needed (nor listed) for the plan
    plan = prepare.plan_split(CFG, raw)
    assert set(plan) == {"split", "counts", "lesions_in_both"}
    frame = ham10000.read_metadata(raw)
    assert plan == make_split(frame, "lesion", 0.2, 101).summary()
    assert plan["lesions_in_both"] == 0
    assert sum(sum(c.values()) for c in plan["counts"].values()) == IMAGES


def test_dry_run_prints_the_plan_as_json(
    raw: FileStore, capsys: pytest.CaptureFixture[str], cli_logging: None
) -> None:
    argv = ["prepare", "--raw", raw.uri, "--dry-run", "--split", "seed", "--val-fraction", "0.5"]
    code = cli.main(argv)
    assert code == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["split"] == "seed"
    assert plan["lesions_in_both"] >= 0
    assert set(plan["counts"]["train"]) == set(CLASSES)


def test_dry_run_reports_bad_metadata_as_bad_input(
    raw: FileStore, capsys: pytest.CaptureFixture[str], cli_logging: None
) -> None:
    text = raw.get_bytes(ham10000.METADATA).decode().replace(",nv,", ",naevus,", 1)
    raw.put_bytes(ham10000.METADATA, text.encode())
    assert cli.main(["prepare", "--raw", raw.uri, "--dry-run"]) == 2
    assert "field 'dx': unknown class 'naevus'" in capsys.readouterr().err


# --- the stage ---------------------------------------------------------------------------


@pytest.mark.slow
def test_prepare_end_to_end_on_files_then_skips_the_rerun(raw: FileStore, tmp_path: Path) -> None:
    out = FileStore(tmp_path / "out")
    manifest = prepare.run_prepare(CFG, raw, out)
    check_output(manifest, out, raw, tmp_path)
    assert manifest["lesions_in_both"] == 0 and manifest["split"] == "lesion"
    assert manifest["synthetic"] is True and manifest["skipped"] == []
    assert (manifest["image_size"], manifest["resize"]) == (64, "squash")
    assert {"class_distribution.png", "config.json"} <= set(manifest["files"])
    assert json.loads(out.get_bytes("config.json"))["image_size"] == 64
    assert Image.open(io.BytesIO(out.get_bytes("class_distribution.png"))).format == "PNG"
    assert all(len(manifest["shards"][s]) >= 1 for s in ("train", "val"))
    # Same inputs and settings: skipped (the committed manifest comes back unchanged).
    again = prepare.run_prepare(build(PrepareConfig, {"workers": 2}, CFG), raw, out)
    assert again == manifest  # workers do not change the output, so not the fingerprint
    # Forced: redone, with byte-identical shards (stable order, deterministic resize).
    forced = prepare.run_prepare(CFG, raw, out, force=True)
    shard_files = {k: v for k, v in manifest["files"].items() if k.endswith(".tfrecord")}
    assert {k: v for k, v in forced["files"].items() if k.endswith(".tfrecord")} == shard_files
    # Another setting: redone.
    other = prepare.run_prepare(build(PrepareConfig, {"val_fraction": 0.3}, CFG), raw, out)
    assert other["fingerprint"] != manifest["fingerprint"]
    assert other["n_images"] == IMAGES and other["val_fraction"] == 0.3


@pytest.mark.slow
def test_prepare_end_to_end_through_s3(raw_dir: Path, s3_store: S3Store, tmp_path: Path) -> None:
    raw = s3_store.child("raw", "HAM10000")
    for obj in FileStore(raw_dir).list():
        raw.put_file(raw_dir / obj.key, obj.key)
    out = s3_store.child("runs", "r1", "prepare")
    cfg = build(PrepareConfig, {"workers": 2, "resize": "crop"}, CFG)
    manifest = prepare.run_prepare(cfg, raw, out)
    check_output(manifest, out, raw, tmp_path)
    assert manifest["resize"] == "crop"
    assert prepare.run_prepare(cfg, raw, out)["created_at"] == manifest["created_at"]


def corrupt_one(raw: Store) -> str:
    frame = ham10000.load(raw).metadata
    key = str(frame.loc[frame["dx"] == "nv", "key"].iloc[0])
    raw.put_bytes(key, b"\xff\xd8\xff\xe0 truncated")
    return key


def test_undecodable_image_fails_the_stage_by_default(raw: FileStore, tmp_path: Path) -> None:
    key = corrupt_one(raw)
    out = FileStore(tmp_path / "out")
    with pytest.raises(DataError, match=f"{key.split('/')[-1]}: cannot decode image"):
        prepare.run_prepare(CFG, raw, out)
    assert not out.exists("manifest.json")


def test_undecodable_image_is_skipped_and_listed_on_request(raw: FileStore, tmp_path: Path) -> None:
    key = corrupt_one(raw)
    out = FileStore(tmp_path / "out")
    manifest = prepare.run_prepare(build(PrepareConfig, {"on_bad_image": "skip"}, CFG), raw, out)
    assert [s["file"] for s in manifest["skipped"]] == [key]
    assert "cannot decode image" in manifest["skipped"][0]["reason"]
    check_output(manifest, out, raw, tmp_path)


def test_a_class_emptied_by_skipped_images_is_named(raw: FileStore, tmp_path: Path) -> None:
    plan = make_split(ham10000.load(raw).metadata, CFG.split, CFG.val_fraction, CFG.seed)
    for key in plan.val.loc[plan.val["dx"] == "df", "key"]:
        raw.put_bytes(str(key), b"\xff\xd8\xff\xe0 truncated")
    out = FileStore(tmp_path / "out")
    cfg = build(PrepareConfig, {"on_bad_image": "skip"}, CFG)
    emptied = r"lesion split: no val images of class\(es\) df \(emptied by the \d+ skipped"
    with pytest.raises(DataError, match=emptied):
        prepare.run_prepare(cfg, raw, out)
    assert not out.exists("manifest.json")
