"""The data report of a run: what prepare read, against the champion's training data.

prepare writes `image_index.csv` (one row per image kept: id, lesion, class, side, sha256
of the file's bytes, stored width and height, mean brightness of the resized image) and
`data_report.json`: class counts and lesions per class, image size and brightness
statistics, exact duplicates (same bytes) across lesions, and, against the data of the
champion at the time (its prepare output, found through its evaluation's lineage): the
same per-class figures, new / removed / changed images, how many of this run's validation
lesions the champion trained on, and a drift flag per class.

Drift rule (per class, against the champion's prepared data):
  - share: the class's share of the images moved by more than SHARE_MIN_CHANGE (2 points)
    and by more than SHARE_Z (3) standard errors of a two-proportion z-test; or
  - brightness: its mean brightness moved by more than BRIGHTNESS_D (0.5) pooled standard
    deviations (Cohen's d), with at least MIN_IMAGES (10) images of the class on each side;
  - or the class has images on one side only.
Without the champion's data (no champion yet, its data gone, prepared before image indexes)
the parts that need it are null and nothing is flagged; the report says why.
`promote.require_no_drift` holds a promotion for review when a class is flagged, or drift
could not be checked (no report, the champion's data gone): see `held_for_review`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from skinlesion.classes import CLASSES
from skinlesion.imaging import ImageStats
from skinlesion.layout import DATA_REPORT_FILE, IMAGE_INDEX_FILE, sibling_stage_uri
from skinlesion.lineage import upstream
from skinlesion.manifest import read_manifest, stage_input_fingerprint
from skinlesion.storage import Store, get_json, open_store

SHARE_MIN_CHANGE = 0.02
SHARE_Z = 3.0
BRIGHTNESS_D = 0.5
MIN_IMAGES = 10
EXAMPLES = 20  # image ids / duplicate groups listed per finding
INDEX_COLUMNS = ("image_id", "lesion_id", "dx", "side", "sha256", "width", "height", "brightness")
RULE = (
    f"a class drifts when its share of the images moves by more than "
    f"{SHARE_MIN_CHANGE * 100:g} percentage points "
    f"and more than {SHARE_Z:g} standard errors (two-proportion z), when its mean brightness "
    f"moves by more than {BRIGHTNESS_D:g} pooled standard deviations (at least {MIN_IMAGES} "
    "images a side), or when it has images on one side only"
)
Row = dict[str, Any]


def index_row(image_id: str, lesion_id: str, dx: str, side: str, stats: ImageStats) -> Row:
    return {
        "image_id": image_id,
        "lesion_id": lesion_id,
        "dx": dx,
        "side": side,
        "sha256": stats.sha256,
        "width": stats.width,
        "height": stats.height,
        "brightness": stats.brightness,
    }


def write_index(path: Path, rows: list[Row]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, INDEX_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def read_index(store: Store) -> list[Row]:
    text = store.get_bytes(IMAGE_INDEX_FILE).decode()
    rows = list(csv.DictReader(io.StringIO(text)))
    for row in rows:
        row["width"], row["height"] = int(row["width"]), int(row["height"])
        row["brightness"] = float(row["brightness"])
    return rows


# --- the champion's data --------------------------------------------------------------------


def champion_data(champion: Store) -> tuple[dict[str, Any] | None, str]:
    """(the champion's prepared data, "") or (None, why there is none to compare with)."""
    from skinlesion.registry import champion_of

    found = champion_of(champion)
    if found is None:
        return None, "no champion yet"
    version, result, _ = found
    up = prepared_of(result.evaluation_uri, result.val_data_fingerprint)
    if up is None:
        return None, f"the champion's prepared data (via {result.evaluation_uri}) is gone"
    store, manifest = up
    return {
        "version": version,
        "run_id": result.run_id,
        "prepare": store.uri,
        "index": read_index(store) if store.exists(IMAGE_INDEX_FILE) else None,
        "counts": manifest.get("counts") or {},
    }, ""


def prepared_of(evaluation_uri: str, val_data: str) -> tuple[Store, dict[str, Any]] | None:
    """The prepare output an evaluation (at `evaluation_uri`, of data whose input
    fingerprint is `val_data`) used: its `val_data` source, else its run's `prepare` prefix
    while that holds the data the fingerprint names."""
    evaluation = read_manifest(open_store(evaluation_uri))
    if evaluation is not None and (up := upstream(evaluation, "val_data")) is not None:
        return up
    uri = sibling_stage_uri(evaluation_uri, "prepare")
    store = open_store(uri) if uri else None
    manifest = read_manifest(store) if store is not None else None
    if store is None or manifest is None or stage_input_fingerprint(manifest) != val_data:
        return None
    return store, manifest


# --- figures --------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    a = np.asarray(values, dtype=float)
    p05, p50, p95 = np.percentile(a, [5, 50, 95])
    return {
        "mean": round(float(a.mean()), 3),
        "std": round(float(a.std(ddof=1)) if len(a) > 1 else 0.0, 3),
        "p05": round(float(p05), 3),
        "p50": round(float(p50), 3),
        "p95": round(float(p95), 3),
    }


def _per_class(rows: list[Row]) -> dict[str, dict[str, Any]]:
    by_class: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        by_class[row["dx"]].append(row)
    total = len(rows)
    out = {}
    for name in CLASSES:
        mine = by_class.get(name, [])
        out[name] = {
            "images": len(mine),
            "lesions": len({r["lesion_id"] for r in mine}),
            "train": sum(r["side"] == "train" for r in mine),
            "val": sum(r["side"] == "val" for r in mine),
            "share": round(len(mine) / total, 5) if total else None,
            "brightness": _stats([r["brightness"] for r in mine]),
        }
    return out


def _from_counts(counts: dict[str, dict[str, int]]) -> dict[str, dict[str, Any]]:
    """Per-class figures from a prepare manifest's counts alone (no image index)."""
    images = {c: sum(int(side.get(c, 0)) for side in counts.values()) for c in CLASSES}
    total = sum(images.values())
    return {
        c: {
            "images": images[c],
            "lesions": None,
            "train": int(counts.get("train", {}).get(c, 0)),
            "val": int(counts.get("val", {}).get(c, 0)),
            "share": round(images[c] / total, 5) if total else None,
            "brightness": None,
        }
        for c in CLASSES
    }


def _sizes(rows: list[Row]) -> dict[str, Any]:
    common: dict[str, int] = defaultdict(int)
    for r in rows:
        common[f"{r['width']}x{r['height']}"] += 1
    top = sorted(common.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    return {
        "width": _stats([r["width"] for r in rows]),
        "height": _stats([r["height"] for r in rows]),
        "distinct": len(common),
        "common": [{"size": size, "images": n} for size, n in top],
    }


def _duplicates(rows: list[Row]) -> dict[str, Any]:
    groups: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        groups[r["sha256"]].append(r)
    dup = [g for g in groups.values() if len(g) > 1]
    across = [g for g in dup if len({r["lesion_id"] for r in g}) > 1]
    across.sort(key=lambda g: sorted(r["image_id"] for r in g))
    return {
        "groups": len(dup),
        "images": sum(len(g) for g in dup),
        "across_lesions": len(across),
        "across_split": sum(len({r["side"] for r in g}) > 1 for g in across),
        "different_dx": sum(len({r["dx"] for r in g}) > 1 for g in across),
        "examples": [
            {
                "sha256": g[0]["sha256"],
                "images": sorted(r["image_id"] for r in g),
                "lesions": sorted({r["lesion_id"] for r in g}),
                "dx": sorted({r["dx"] for r in g}),
                "sides": sorted({r["side"] for r in g}),
            }
            for g in across[:EXAMPLES]
        ],
    }


def _changes(rows: list[Row], before: list[Row]) -> dict[str, Any]:
    now = {r["image_id"]: r["sha256"] for r in rows}
    then = {r["image_id"]: r["sha256"] for r in before}
    new = sorted(set(now) - set(then))
    removed = sorted(set(then) - set(now))
    changed = sorted(i for i in set(now) & set(then) if now[i] != then[i])
    return {
        "new": len(new),
        "removed": len(removed),
        "changed": len(changed),
        "examples": {
            "new": new[:EXAMPLES],
            "removed": removed[:EXAMPLES],
            "changed": changed[:EXAMPLES],
        },
    }


def _seen(rows: list[Row], before: list[Row]) -> dict[str, int]:
    """This run's validation lesions and images the champion trained on: its figures on
    them are inflated, and a comparison on this validation data favours it."""
    trained = {r["lesion_id"] for r in before if r["side"] == "train"}
    val = [r for r in rows if r["side"] == "val"]
    lesions = {r["lesion_id"] for r in val}
    return {
        "lesions": len(lesions & trained),
        "of_lesions": len(lesions),
        "images": sum(r["lesion_id"] in trained for r in val),
        "of_images": len(val),
    }


def _drift(
    now: dict[str, dict[str, Any]], then: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    n_total = sum(c["images"] for c in now.values())
    m_total = sum(c["images"] for c in then.values())
    out = {}
    for name in CLASSES:
        a, b = now[name], then[name]
        reasons = []
        if (a["images"] > 0) != (b["images"] > 0):
            reasons.append("images on one side only")
        p, q = a["images"] / n_total, b["images"] / m_total
        pooled = (a["images"] + b["images"]) / (n_total + m_total)
        se = math.sqrt(pooled * (1 - pooled) * (1 / n_total + 1 / m_total))
        z = (p - q) / se if se > 0 else 0.0
        if abs(p - q) > SHARE_MIN_CHANGE and abs(z) > SHARE_Z:
            reasons.append(f"share {q:.3f} -> {p:.3f} (z {z:+.1f})")
        d = _cohen_d(a, b)
        if d is not None and abs(d) > BRIGHTNESS_D:
            mean_a, mean_b = a["brightness"]["mean"], b["brightness"]["mean"]
            reasons.append(f"brightness {mean_b:.1f} -> {mean_a:.1f} (d {d:+.2f})")
        out[name] = {
            "drift": bool(reasons),
            "reasons": reasons,
            "share": round(p, 5),
            "champion_share": round(q, 5),
            "share_z": round(z, 3),
            "brightness_d": None if d is None else round(d, 3),
        }
    return out


def _cohen_d(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    sa, sb = a["brightness"], b["brightness"]
    n, m = a["images"], b["images"]
    if sa is None or sb is None or n < MIN_IMAGES or m < MIN_IMAGES:
        return None
    pooled = math.sqrt(((n - 1) * sa["std"] ** 2 + (m - 1) * sb["std"] ** 2) / (n + m - 2))
    return (sa["mean"] - sb["mean"]) / pooled if pooled > 0 else 0.0


def build(rows: list[Row], champion: dict[str, Any] | None, why_not: str = "") -> dict[str, Any]:
    """The report of the images in `rows` against `champion_data`'s (or none)."""
    classes = _per_class(rows)
    report: dict[str, Any] = {
        "images": len(rows),
        "lesions": len({r["lesion_id"] for r in rows}),
        "classes": classes,
        "image_size": _sizes(rows),
        "brightness": _stats([r["brightness"] for r in rows]),
        "duplicates": _duplicates(rows),
        "champion": None,
        "changes": None,
        "champion_trained_on_val": None,
        "drift": {"rule": RULE, "checked": False, "why_not": why_not, "flagged": [], "classes": {}},
    }
    if champion is None:
        return report
    index = champion["index"]
    then = _per_class(index) if index is not None else _from_counts(champion["counts"])
    report["champion"] = {
        "version": champion["version"],
        "run_id": champion["run_id"],
        "prepare": champion["prepare"],
        "images": sum(c["images"] for c in then.values()),
        "lesions": len({r["lesion_id"] for r in index}) if index is not None else None,
        "classes": then,
    }
    if index is not None:
        report["changes"] = _changes(rows, index)
        report["champion_trained_on_val"] = _seen(rows, index)
    if not rows or not report["champion"]["images"]:
        report["drift"]["why_not"] = "no images to compare"
        return report
    drift = _drift(classes, then)
    report["drift"].update(
        checked=True,
        why_not="" if index is not None else "brightness not compared: no champion image index",
        flagged=[c for c in CLASSES if drift[c]["drift"]],
        classes=drift,
    )
    return report


def write(work: Path, rows: list[Row], champion: Store | None) -> dict[str, Any]:
    """Write image_index.csv and data_report.json into `work`; returns the report."""
    write_index(work / IMAGE_INDEX_FILE, rows)
    data, why_not = champion_data(champion) if champion is not None else (None, "no --champion")
    report = build(rows, data, why_not)
    (work / DATA_REPORT_FILE).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    return report


def read_report(prepared: Store) -> dict[str, Any] | None:
    return get_json(prepared, DATA_REPORT_FILE) if prepared.exists(DATA_REPORT_FILE) else None


def held_for_review(evaluation_uri: str, evaluation: dict[str, Any]) -> str:
    """Why a promotion is held under `promote.require_no_drift` ("" when it is not): the
    candidate's data report (of its evaluation's `val_data`) flags drift, or is missing."""
    up = prepared_of(evaluation_uri, evaluation["inputs"]["val_data"])
    report = read_report(up[0]) if up is not None else None
    if report is None:
        return "no data report for the candidate's data (prepared before data reports)"
    if not report["drift"]["checked"]:
        return f"drift not checked: {report['drift']['why_not']}"
    flagged = report["drift"]["flagged"]
    if not flagged:
        return ""
    reasons = "; ".join(
        f"{c}: {', '.join(report['drift']['classes'][c]['reasons'])}" for c in flagged
    )
    version = (report.get("champion") or {}).get("version")
    return f"data drift against champion version {version}'s data ({reasons})"
