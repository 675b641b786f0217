"""The prepare stage: validate a HAM10000 tree, split it, resize every image once
and write TFRecord shards per split.

Streaming with bounded memory: worker processes fetch each image's bytes from
the store and decode/resize them (JPEG DCT downscale-on-decode); the main
process writes the results, in a stable order, into the shards. At most a few
chunks of images per worker are in flight, whatever the dataset size.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from skinlesion import config, data_report, faults, ham10000, logs
from skinlesion.classes import CLASSES, INDEX
from skinlesion.imaging import (
    ResizeJob,
    ResizeResult,
    init_worker,
    ordered_map,
    resize_chunk,
    resolve_workers,
)
from skinlesion.manifest import commit_stage, input_fingerprints
from skinlesion.plots.distribution import class_distribution
from skinlesion.results import PrepareResult
from skinlesion.shards import Example, ShardWriter
from skinlesion.split import Split, check_every_class, make_split
from skinlesion.storage import Store

SIDES = ("train", "val")
CHUNK = 32  # images per worker task (fewer, larger tasks: less IPC per image)


def plan_split(cfg: config.PrepareConfig, raw: Store) -> dict[str, Any]:
    """The split plan from the metadata alone (reads no image): for --dry-run."""
    data = ham10000.load(raw, with_images=False)
    return make_split(data.metadata, cfg.split, cfg.val_fraction, cfg.seed).summary()


# --- the stage ---------------------------------------------------------------------------


def _ordered_rows(split: Split) -> pd.DataFrame:
    """Train rows then val rows, in the split's (seeded) order, with their side."""
    return pd.concat([split.train.assign(side="train"), split.val.assign(side="val")])


def _jobs(rows: pd.DataFrame, cfg: config.PrepareConfig) -> Iterator[ResizeJob]:
    keys = list(rows["key"])
    for i in range(0, len(keys), CHUNK):
        yield ResizeJob(
            tuple(keys[i : i + CHUNK]),
            cfg.image_size,
            cfg.resize,
            cfg.jpeg_quality,
            cfg.on_bad_image == "skip",
        )


def _results(
    rows: pd.DataFrame, cfg: config.PrepareConfig, raw: Store
) -> Iterator[tuple[Any, ResizeResult]]:
    """(row, result) per image, in row order, computed by the worker pool."""
    workers = resolve_workers(cfg.workers)
    chunks = ordered_map(resize_chunk, _jobs(rows, cfg), workers, init_worker, (raw.uri,))
    records = rows.itertuples(index=False)
    for chunk in chunks:
        for result in chunk:
            yield next(records), result


def _write_shards(
    split: Split, cfg: config.PrepareConfig, raw: Store, work: Path, index: list[dict[str, Any]]
) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, str]], dict[str, pd.DataFrame]]:
    """Resize every image and write the shards, one `index` row per image kept; returns
    shards, skipped, rows written."""
    log = logs.get()
    rows = _ordered_rows(split)
    skipped: list[dict[str, str]] = []
    kept: list[bool] = []
    with contextlib.ExitStack() as stack:
        writers = {s: stack.enter_context(ShardWriter(work, s, cfg.shard_size)) for s in SIDES}
        for row, result in logs.progress(_results(rows, cfg, raw), len(rows), "prepare", "image"):
            kept.append(result.jpeg is not None)
            if result.jpeg is None:
                log.warning("image_skipped", image_id=row.image_id, reason=result.error)
                skipped.append({"image_id": row.image_id, "file": row.key, "reason": result.error})
                continue
            example = Example(result.jpeg, INDEX[row.dx], row.image_id, row.lesion_id)
            writers[row.side].write(example)
            assert result.stats is not None
            index.append(
                data_report.index_row(row.image_id, row.lesion_id, row.dx, row.side, result.stats)
            )
            faults.point("image")
        shards = {side: writer.close() for side, writer in writers.items()}
    written = rows[kept]
    return shards, skipped, {side: written[written["side"] == side] for side in SIDES}


def run_prepare(
    cfg: config.PrepareConfig,
    raw: Store,
    out: Store,
    force: bool = False,
    champion: Store | None = None,
) -> dict[str, Any]:
    """Validate, split, resize and shard the tree at `raw` into `out`; the manifest. The
    data report compares the images with the training data of the `champion` prefix's
    model (…/models/latest) at this time; not an input: it does not change the shards."""
    log = logs.get()
    settings = config.stage_settings("prepare", cfg)
    inputs = input_fingerprints({"raw": raw.uri})

    def body(work: Path) -> PrepareResult:
        start = time.monotonic()
        data = ham10000.load(raw)
        if data.synthetic:
            log.warning(
                "synthetic_data",
                message="raw data is SYNTHETIC (SYNTHETIC.json): "
                "figures from it are not medical results",
                raw=raw.uri,
            )
        split = make_split(data.metadata, cfg.split, cfg.val_fraction, cfg.seed)
        log.info("split", **split.summary(), images=len(data.metadata))
        index: list[dict[str, Any]] = []
        shards, skipped, written = _write_shards(split, cfg, raw, work, index)
        result = Split(split.method, written["train"], written["val"])
        if skipped:
            check_every_class(result, len(skipped))  # skipping may have emptied a class
        counts = result.counts
        class_distribution(
            counts,
            work / "class_distribution.png",
            f"HAM10000 {split.method} split{' (SYNTHETIC data)' if data.synthetic else ''}",
        )
        (work / "config.json").write_text(json.dumps(config.to_dict(cfg), indent=2) + "\n")
        report = data_report.write(work, index, champion)
        log.info(
            "data_report",
            duplicates_across_lesions=report["duplicates"]["across_lesions"],
            champion_version=(report["champion"] or {}).get("version"),
            drift=report["drift"]["flagged"],
            drift_checked=report["drift"]["checked"],
        )
        seconds = time.monotonic() - start
        n_images = sum(sum(c.values()) for c in counts.values())
        log.info(
            "prepare_done",
            images=n_images,
            train=sum(counts["train"].values()),
            val=sum(counts["val"].values()),
            skipped=len(skipped),
            lesions_in_both=result.lesions_in_both,
            synthetic=data.synthetic,
            images_per_s=round(len(data.metadata) / seconds, 1),
            seconds=round(seconds, 1),
            **{f"{side}_{name}": n for side in SIDES for name, n in counts[side].items()},
        )
        return PrepareResult(
            shards=shards,
            counts=counts,
            lesions_in_both=result.lesions_in_both,
            skipped=skipped,
            image_size=cfg.image_size,
            resize=cfg.resize,
            jpeg_quality=cfg.jpeg_quality,
            split=split.method,
            val_fraction=cfg.val_fraction,
            synthetic=data.synthetic,
            n_images=n_images,
            classes=list(CLASSES),
            seconds=round(seconds, 1),
        )

    return commit_stage("prepare", out, settings, inputs, body, force, input_uris={"raw": raw.uri})
