"""The data report: its figures and drift rule on hand-made image indexes, the report
section, and end to end: prepare compares a changed tree with the champion's data, and
`promote.require_no_drift` holds the promotion until a reviewer releases it."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from skinlesion import config, data_report, prepare, report, report_data
from skinlesion.classes import CLASSES
from skinlesion.layout import DATA_REPORT_FILE, IMAGE_INDEX_FILE
from skinlesion.manifest import commit_stage, input_fingerprints, read_manifest
from skinlesion.promote import run_promote
from skinlesion.storage import FileStore, Store, get_json
from skinlesion.synthetic import write_sample_data
from tests.test_promote import CFG, make_candidate

PREPARE = config.PrepareConfig(image_size=32, shard_size=64, workers=1)


def rows(per_class: dict[str, int], brightness: float = 120.0, seed: int = 0) -> list[dict]:
    """An image index: one lesion per two images, brightness around `brightness`."""
    rng = np.random.default_rng(seed)
    out = []
    for name, n in per_class.items():
        for i in range(n):
            out.append(
                {
                    "image_id": f"{name}_{i}",
                    "lesion_id": f"L_{name}_{i // 2}",
                    "dx": name,
                    "side": "val" if i % 5 == 0 else "train",
                    "sha256": hashlib.sha256(f"{name}_{i}".encode()).hexdigest(),
                    "width": 600,
                    "height": 450,
                    "brightness": float(brightness + rng.normal(0, 10)),
                }
            )
    return out


BASE = {"akiec": 30, "bcc": 50, "bkl": 100, "df": 12, "mel": 110, "nv": 650, "vasc": 14}


def champion_of(index: list[dict] | None, counts: dict | None = None) -> dict[str, Any]:
    return {"version": 3, "run_id": "r0", "prepare": "x", "index": index, "counts": counts or {}}


def test_counts_duplicates_and_changes() -> None:
    now = rows(BASE)
    now[1]["sha256"] = now[0]["sha256"]  # same lesion: a duplicate, not across lesions
    now[4] = {**now[4], "sha256": now[100]["sha256"]}  # akiec_4 = a bkl image: across lesions
    before = [*rows(BASE)[:-3], {**rows({"vasc": 1})[0], "image_id": "gone"}]
    before[2] = {**before[2], "sha256": "f" * 64}  # akiec_2: changed bytes since
    got = data_report.build(now, champion_of(before))
    assert got["images"] == sum(BASE.values()) and got["lesions"] == sum(
        (n + 1) // 2 for n in BASE.values()
    )
    assert got["classes"]["mel"]["images"] == 110 and got["classes"]["mel"]["lesions"] == 55
    dup = got["duplicates"]
    assert (dup["groups"], dup["images"], dup["across_lesions"], dup["different_dx"]) == (
        2,
        4,
        1,
        1,
    )
    assert dup["examples"][0]["dx"] == ["akiec", "bkl"]
    assert got["changes"]["new"] == 3 and got["changes"]["removed"] == 1
    assert got["changes"]["examples"]["removed"] == ["gone"]
    assert set(got["changes"]["examples"]["changed"]) == {"akiec_1", "akiec_2", "akiec_4"}
    assert got["image_size"]["common"] == [{"size": "600x450", "images": sum(BASE.values())}]
    assert got["champion"]["version"] == 3 and got["champion"]["lesions"] is not None


def test_validation_lesions_the_champion_trained_on() -> None:
    now = rows(BASE)
    trained = [{**r, "side": "train"} for r in now]
    seen = data_report.build(now, champion_of(trained))["champion_trained_on_val"]
    val = [r for r in now if r["side"] == "val"]
    assert seen == {
        "lesions": len({r["lesion_id"] for r in val}),
        "of_lesions": len({r["lesion_id"] for r in val}),
        "images": len(val),
        "of_images": len(val),
    }
    elsewhere = [{**r, "lesion_id": "other-" + r["lesion_id"]} for r in trained]
    assert data_report.build(now, champion_of(elsewhere))["champion_trained_on_val"]["images"] == 0
    html = report_data.section(data_report.build(now, champion_of(trained)))
    assert f"{len(val)} of {len(val)} validation images" in html


def test_the_drift_rule() -> None:
    same = data_report.build(rows(BASE, seed=1), champion_of(rows(BASE, seed=2)))
    assert same["drift"]["checked"] and same["drift"]["flagged"] == []  # noise only

    shifted = dict(BASE, mel=220)  # mel's share 0.114 -> 0.204
    darker = [
        r if r["dx"] != "bkl" else {**r, "brightness": r["brightness"] - 15} for r in rows(shifted)
    ]
    got = data_report.build(darker, champion_of(rows(BASE)))
    drift = got["drift"]["classes"]
    assert got["drift"]["flagged"] == ["bkl", "mel", "nv"]  # nv's share falls as mel's grows
    assert drift["mel"]["drift"] and drift["mel"]["reasons"][0].startswith("share 0.114 -> 0.")
    assert (
        drift["bkl"]["reasons"][-1].startswith("brightness") and drift["bkl"]["brightness_d"] < -0.5
    )
    assert not drift["df"]["drift"]  # a small class's share moves little

    gone = data_report.build(rows(dict(BASE, df=0)), champion_of(rows(BASE)))
    assert "images on one side only" in gone["drift"]["classes"]["df"]["reasons"]

    few = {c: 4 for c in CLASSES}  # under MIN_IMAGES a side: brightness is not judged
    dim = data_report.build(rows(few, 60.0), champion_of(rows(few, 160.0)))
    assert dim["drift"]["flagged"] == [] and dim["drift"]["classes"]["nv"]["brightness_d"] is None


def test_without_the_champions_index_or_champion() -> None:
    counts = {"train": dict.fromkeys(CLASSES, 8), "val": dict.fromkeys(CLASSES, 2)}
    got = data_report.build(rows(BASE), champion_of(None, counts))
    assert got["changes"] is None and got["champion"]["lesions"] is None
    assert got["drift"]["checked"] and "no champion image index" in got["drift"]["why_not"]
    assert "nv" in got["drift"]["flagged"]  # 10 of 70 then, 650 of 966 now: a share shift
    alone = data_report.build(rows(BASE), None, "no champion yet")
    assert alone["champion"] is None and not alone["drift"]["checked"]
    assert alone["drift"]["why_not"] == "no champion yet"


def test_the_report_section_escapes_and_warns() -> None:
    now = rows(dict(BASE, mel=220))
    now[0]["image_id"] = "<script>x</script>"
    now[0]["sha256"] = now[500]["sha256"]
    got = data_report.build(now, champion_of(rows(BASE)))
    html = report_data.section(got)
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "Drift flagged in mel" in html and "version 3" in html
    assert "defeats the lesion split" in html  # the duplicate spans train and val
    page = report.render(report.ReportInputs(metrics={}, data_report=got))
    assert "Data against the champion" in page
    assert "prepared before data reports" in report_data.section(None)


# --- end to end ---------------------------------------------------------------------------


def _rewrite(raw: Path, frame: list[dict[str, str]]) -> None:
    with (raw / "HAM10000_metadata.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, list(frame[0]))
        writer.writeheader()
        writer.writerows(frame)


def _image(raw: Path, image_id: str) -> Path:
    return next(raw.glob(f"HAM10000_images_part_*/{image_id}.jpg"))


@pytest.mark.slow
def test_prepare_compares_with_the_champion_and_promote_holds_drift(tmp_path: Path) -> None:
    raw1 = tmp_path / "raw1"
    write_sample_data(FileStore(raw1), images=70, seed=0)
    store = FileStore(tmp_path / "store")
    target = store.child("models", "latest")
    first = prepare.run_prepare(PREPARE, FileStore(raw1), store.child("runs", "r1", "prepare"))
    assert {DATA_REPORT_FILE, IMAGE_INDEX_FILE} <= set(first["files"])
    alone = get_json(store.child("runs", "r1", "prepare"), DATA_REPORT_FILE)
    assert alone["champion"] is None and alone["drift"]["why_not"] == "no --champion"
    make_candidate(store, "r1", 0.60, 0.5)  # an opaque model evaluated on r1's real data
    assert run_promote(
        CFG, store.child("runs/r1/evaluate"), store.child("runs/r1/train"), target, "r1"
    )["decision"]["promoted"]

    # The new tree: every nv image darker (re-encoded), one image gone, one new image that
    # is another lesion's file byte for byte.
    raw2 = Path(shutil.copytree(raw1, tmp_path / "raw2"))
    frame = list(csv.DictReader((raw2 / "HAM10000_metadata.csv").open()))
    nv = [r for r in frame if r["dx"] == "nv"]
    for row in nv:
        path = _image(raw2, row["image_id"])
        pixels = np.asarray(Image.open(path), dtype=float) * 0.6
        buf = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buf, "JPEG", quality=90)
        path.write_bytes(buf.getvalue())
    removed = frame.pop(0 if frame[0]["dx"] == "nv" else frame.index(nv[0]))
    source = next(r for r in frame if r["dx"] == "mel")
    copy = {**source, "image_id": "ISIC_9999999", "lesion_id": "HAM_9999999"}
    shutil.copy(
        _image(raw2, source["image_id"]),
        _image(raw2, source["image_id"]).with_name("ISIC_9999999.jpg"),
    )
    _rewrite(raw2, [*frame, copy])

    prepare.run_prepare(
        PREPARE, FileStore(raw2), store.child("runs", "r2", "prepare"), champion=target
    )
    got = get_json(store.child("runs", "r2", "prepare"), DATA_REPORT_FILE)
    assert got["champion"] is not None, got["drift"]["why_not"]
    assert got["champion"]["version"] == 1 and got["champion"]["run_id"] == "r1"
    assert got["changes"]["new"] == 1 and got["changes"]["removed"] == 1
    assert got["changes"]["examples"]["removed"] == [removed["image_id"]]
    assert got["changes"]["changed"] == len(nv) - (removed["dx"] == "nv")
    assert got["duplicates"]["across_lesions"] == 1
    assert got["duplicates"]["examples"][0]["images"] == sorted(
        [source["image_id"], "ISIC_9999999"]
    )
    assert "nv" in got["drift"]["flagged"]
    assert got["drift"]["classes"]["nv"]["reasons"][-1].startswith("brightness")

    evaluation, model, _ = make_candidate(store, "r2", 0.90, 0.5)
    strict = config.PromoteConfig(require_no_drift=True, serving_export=False)
    held = run_promote(strict, evaluation, model, target, "r2")["decision"]
    assert held["promoted"] is False and held["held_for_review"] is True
    assert held["reason"].startswith("held for review: data drift against champion version 1")
    assert "nv: brightness" in held["reason"] and "otherwise: beats the champion" in held["reason"]
    released = run_promote(CFG, evaluation, model, target, "r2")["decision"]  # the reviewer
    assert released["promoted"] is True and released["version"] == 2
    manifest = read_manifest(store.child("runs", "r2", "prepare"))
    assert manifest is not None and DATA_REPORT_FILE in manifest["files"]


def test_a_missing_report_holds_too(tmp_path: Path) -> None:
    store: Store = FileStore(tmp_path / "store")
    target = store.child("models", "latest")
    run_promote(CFG, *make_candidate(store, "r1", 0.6, 0.5)[:2], target, "r1")
    evaluation, model, _ = make_candidate(store, "r2", 0.9, 0.5)  # hand-made prepare: no report
    strict = config.PromoteConfig(require_no_drift=True, serving_export=False)
    decision = run_promote(strict, evaluation, model, target, "r2")["decision"]
    assert decision["promoted"] is False
    assert "no data report for the candidate's data" in decision["reason"]


def test_what_holds_a_promotion(tmp_path: Path) -> None:
    run = FileStore(tmp_path / "store").child("runs", "r2")
    prepared = run.child("prepare")

    def held(got: dict[str, Any] | None) -> str:
        def body(work: Path) -> dict[str, Any]:
            if got is not None:
                (work / DATA_REPORT_FILE).write_text(json.dumps(got))
            return {}

        commit_stage("prepare", prepared, {}, {}, body, force=True)
        val = input_fingerprints({"val_data": prepared.uri})["val_data"]
        evaluation = {"inputs": {"val_data": val}, "sources": {"val_data": prepared.uri}}
        return data_report.held_for_review(run.child("evaluate").uri, evaluation)

    assert held(data_report.build(rows(BASE, seed=1), champion_of(rows(BASE, seed=2)))) == ""
    drift = held(data_report.build(rows(dict(BASE, mel=220)), champion_of(rows(BASE))))
    assert drift.startswith("data drift against champion version 3's data (mel: share 0.114")
    assert held(data_report.build(rows(BASE), None, "no champion yet")) == (
        "drift not checked: no champion yet"
    )
    assert "no data report" in held(None)
