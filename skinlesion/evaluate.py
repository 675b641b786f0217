"""Evaluate stage: the model on the validation split -> metrics, plots, report.

Inputs: a train/finetune output (`model.keras`) and the prepare output (val
shards). Outputs under the stage prefix: `metrics.json` (exactly the keys
of the contract, metrics.FILE_KEYS), `predictions.csv`, `confusion_matrix.png`,
`roc.png`, `reliability.png`, and a self-contained `report.html`.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from skinlesion import bootstrap, config, faults, logs, report, shards
from skinlesion.classes import CLASSES, NUM_CLASSES
from skinlesion.data_report import read_report
from skinlesion.errors import DamagedRun, InputError
from skinlesion.layout import METRICS_FILE, MODEL_FILE, PREDICTIONS_FILE, REPORT_FILE
from skinlesion.lineage import upstream
from skinlesion.manifest import commit_stage, input_fingerprints, read_result
from skinlesion.metrics import compute_metrics, headline
from skinlesion.model import load_model, model_image_size
from skinlesion.plots import evaluation as plots
from skinlesion.results import EvaluateResult, PrepareResult, TrainResult
from skinlesion.scratch import scratch_dir
from skinlesion.storage import Store, sha256_file

# --- prediction over the val shards ------------------------------------------------------


BOOTSTRAP_SEED = 0  # fixed: the same predictions always give the same intervals


def predict_shards(
    net: Any,
    paths: list[Path],
    batch_size: int,
    counts: list[int] | None = None,
    desc: str = "evaluate",
) -> tuple[list[shards.Example], np.ndarray]:
    """(examples without their JPEG bytes, [n, 7] probabilities), in shard order.

    Each shard is read twice in the same order: by `shards.dataset` for the
    pixels (the training input path) and by `shards.iter_examples` for the ids;
    the labels of both reads must agree.
    """
    examples: list[shards.Example] = []
    probs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    total = sum(math.ceil(c / batch_size) for c in counts) if counts else None

    def batches() -> Iterator[tuple[Any, Any]]:
        for path in paths:
            yield from shards.dataset([path], NUM_CLASSES, batch_size, shuffle=False, seed=0)

    for images, onehot in logs.progress(batches(), total, desc, "batch"):
        out = np.asarray(net.predict_on_batch(images), dtype=np.float64)
        if out.ndim != 2 or out.shape[1] != NUM_CLASSES:
            raise InputError(
                f"the model outputs shape {out.shape}, expected [batch, {NUM_CLASSES}]"
            )
        probs.append(out)
        labels.append(np.asarray(onehot).argmax(axis=1))
        faults.point("predict")
    for ex in shards.iter_examples(paths):
        examples.append(shards.Example(b"", ex.label, ex.image_id, ex.lesion_id))
    proba = np.concatenate(probs) if probs else np.zeros((0, NUM_CLASSES))
    seen = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
    if len(examples) != len(proba) or not np.array_equal(seen, [e.label for e in examples]):
        raise InputError("val shards read inconsistently (ids and pixels out of step)")
    if not examples:
        raise InputError("the val split holds no images")
    return examples, proba


def write_predictions(path: Path, examples: list[shards.Example], proba: np.ndarray) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            ["image_id", "lesion_id", "true", "predicted", *(f"p_{c}" for c in CLASSES)]
        )
        for ex, row in zip(examples, proba, strict=True):
            writer.writerow(
                [
                    ex.image_id,
                    ex.lesion_id,
                    CLASSES[ex.label],
                    CLASSES[int(row.argmax())],
                    *(f"{v:.6f}" for v in row),
                ]
            )
    return path


# --- report inputs from upstream stages ---------------------------------------------------


def _fetch_png(store: Store, key: str, dest: Path) -> Path | None:
    if not store.exists(key):
        return None
    path = dest / f"{len(list(dest.iterdir()))}-{key}"
    store.get_file(key, path)
    return path


def upstream_figures(
    model: Store, model_manifest: dict[str, Any], val_data: Store, dest: Path
) -> tuple[list[tuple[str, Path]], list[tuple[str, Path]], dict[str, Any] | None]:
    """(training plots, data plots, augment manifest) of this model's lineage: the
    upstream prefixes its manifest records, while they hold what it was built from."""
    training: list[tuple[str, Path]] = []
    top = upstream(model_manifest, "init_model")
    if top is not None and (png := _fetch_png(top[0], "training_curves.png", dest)):
        training.append(("Training curves, phase top (head only)", png))
    phase = model_manifest.get("phase", model_manifest["stage"])
    if png := _fetch_png(model, "training_curves.png", dest):
        training.append((f"Training curves, phase {phase} (the evaluated model)", png))

    data: list[tuple[str, Path]] = []
    if png := _fetch_png(val_data, "class_distribution.png", dest):
        data.append(("Class distribution per split (prepare)", png))
    train_data = upstream(model_manifest, "train_data")
    augment = train_data[1] if train_data and train_data[1].get("stage") == "augment" else None
    if train_data is not None and augment is not None:
        for key, caption in (
            ("class_balance.png", "Training classes before and after augmentation"),
            ("augment_samples.png", "Augmented training samples"),
        ):
            if png := _fetch_png(train_data[0], key, dest):
                data.append((caption, png))
    return training, data, augment


# --- the stage ------------------------------------------------------------------------------


def run_evaluate(
    cfg: config.EvaluateConfig, model: Store, val_data: Store, out: Store, force: bool = False
) -> dict[str, Any]:
    """Evaluate `model` on the val split of `val_data`; returns the committed manifest."""
    log = logs.get()
    settings = config.stage_settings("evaluate", cfg)
    inputs = input_fingerprints({"model": model.uri, "val_data": val_data.uri})
    model_manifest, _ = read_result(model, TrainResult, "model")
    data_manifest, data = read_result(val_data, PrepareResult, "val_data")
    recorded = model_manifest["files"].get(MODEL_FILE)
    if recorded is None or not model.exists(MODEL_FILE):
        raise InputError(f"{model.uri} has no {MODEL_FILE}")
    prep = data.preprocessing

    def body(work: Path) -> EvaluateResult:
        with scratch_dir("skinlesion-evaluate-in-") as tmp:
            model.get_file(MODEL_FILE, tmp / MODEL_FILE)
            model_sha = sha256_file(tmp / MODEL_FILE)
            if recorded["sha256"] != model_sha:  # rewritten since its manifest was read
                raise DamagedRun(f"{model.uri}/{MODEL_FILE} is not the file its manifest records")
            net = load_model(tmp / MODEL_FILE)
            size = model_image_size(net)
            if size != prep.image_size:
                raise InputError(
                    f"the model expects {size}x{size} images but {val_data.uri} holds "
                    f"{prep.image_size}x{prep.image_size}"
                )
            paths = shards.fetch_split(val_data, data.shards, "val", tmp / "shards")
            listed = shards.split_shards(data.shards, "val", val_data.uri)
            counts = [int(s["count"]) for s in listed]
            examples, proba = predict_shards(net, paths, cfg.batch_size, counts)
            y = np.array([e.label for e in examples], dtype=np.int64)
            metrics = compute_metrics(y, proba, cfg.ece_bins)
            lesions = [e.lesion_id for e in examples]
            metrics["intervals"] = bootstrap.intervals(y, proba, lesions, seed=BOOTSTRAP_SEED)
            (work / METRICS_FILE).write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
            write_predictions(work / PREDICTIONS_FILE, examples, proba)
            figures = [
                (
                    "Confusion matrix",
                    plots.confusion_matrix_png(
                        metrics["confusion_matrix"], work / "confusion_matrix.png"
                    ),
                ),
                (
                    "One-vs-rest ROC curves (melanoma highlighted)",
                    plots.roc_png(y, proba, metrics["roc_auc_macro"], work / "roc.png"),
                ),
                (
                    "Reliability diagram",
                    plots.reliability_png(
                        y, proba, cfg.ece_bins, metrics["ece"], work / "reliability.png"
                    ),
                ),
            ]
            pngs = tmp / "upstream"
            pngs.mkdir()
            training, data_plots, augment = upstream_figures(model, model_manifest, val_data, pngs)
            report.write(
                work / REPORT_FILE,
                report.ReportInputs(
                    metrics=metrics,
                    plots=figures,
                    training_plots=training,
                    data_plots=data_plots,
                    data_manifest=data_manifest,
                    data_report=read_report(val_data),
                    augment_manifest=augment,
                    model_manifest=model_manifest,
                    evaluate_settings=settings,
                    sources={
                        "model": model.uri,
                        "validation data": val_data.uri,
                        "report": out.uri,
                    },
                    created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                ),
            )
        return EvaluateResult(
            metrics=headline(metrics),
            preprocessing=prep,
            synthetic=data.synthetic,
            model_stage=model_manifest["stage"],
            model_sha256=model_sha,
        )

    manifest = commit_stage(
        "evaluate",
        out,
        settings,
        inputs,
        body,
        force,
        input_uris={"model": model.uri, "val_data": val_data.uri},
    )
    log.info(
        "evaluate_done",
        out=out.uri,
        synthetic=manifest["synthetic"],
        **manifest["metrics"],
    )
    return manifest
