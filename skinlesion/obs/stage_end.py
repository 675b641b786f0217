"""What a stage process reports to MLflow once its stage is committed (off unless MLflow is
configured and the stage runs for a pipeline run id): its config section as params, its
figures as metrics, its report, plots and records as artifacts under `<stage>/`, and on
promotion the registered champion."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

from skinlesion.errors import InputError
from skinlesion.keys import safe_run_id
from skinlesion.layout import MODEL_FILE, TENSORBOARD_DIR
from skinlesion.obs import mlflow_log
from skinlesion.scratch import scratch_dir
from skinlesion.storage import Store

ARTIFACT_SUFFIXES = frozenset({".png", ".html", ".json", ".csv"})
MAX_ARTIFACT_BYTES = 20 * 2**20  # reports, plots and records; never shards or models
# The final figures of each stage's manifest: field -> metric name (after `<stage>.`).
# Training stages' per-epoch curves are logged while they train (train_callbacks).
_TRAINING = {
    "best_val_accuracy": "best_val_accuracy",
    "best_epoch": "best_epoch",
    "epochs_run": "epochs_run",
    "images_per_s": "median_images_per_second",
    "train_images": "train_images",
    "val_images": "val_images",
}
FIGURES: dict[str, dict[str, str]] = {
    "prepare": {"n_images": "images", "lesions_in_both": "lesions_in_both", "seconds": "seconds"},
    "augment": {"n_images": "images"},
    "train": _TRAINING,
    "finetune": _TRAINING,
}


def pipeline_run(run_id: str) -> bool:
    """Whether `run_id` names a pipeline run (stage commands default to "-")."""
    try:
        safe_run_id(run_id)
    except InputError:
        return False
    return True


def figures(stage: str, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The final metrics of a stage: evaluate's headline figures under their own names
    (`balanced_accuracy`, ...), the others' `FIGURES` as `<stage>.<name>`."""
    if stage == "evaluate":
        return dict(manifest.get("metrics") or {})
    if stage == "promote":
        decision = manifest.get("decision") or {}
        return {"promote.promoted": float(bool(decision.get("promoted")))}
    named = FIGURES.get(stage, {})
    return {f"{stage}.{name}": manifest[key] for key, name in named.items() if key in manifest}


def artifact_keys(manifest: Mapping[str, Any]) -> list[str]:
    """The committed files logged as artifacts: reports, plots and JSON/CSV records."""
    files = manifest.get("files") or {}
    return sorted(
        key
        for key, meta in files.items()
        if PurePosixPath(key).suffix in ARTIFACT_SUFFIXES
        and not key.startswith(f"{TENSORBOARD_DIR}/")
        and int((meta or {}).get("size") or 0) <= MAX_ARTIFACT_BYTES
    )


def report(
    stage: str,
    run_id: str,
    section: str,
    settings: Mapping[str, Any],
    out: Store,
    manifest: Mapping[str, Any],
    model: Store | None = None,
) -> None:
    """Log a committed stage into the pipeline run's MLflow run; never raises."""
    if mlflow_log.enabled() and pipeline_run(run_id):
        mlflow_log.guarded(
            "stage_report", lambda: _report(stage, run_id, section, settings, out, manifest, model)
        )


def _report(
    stage: str,
    run_id: str,
    section: str,
    settings: Mapping[str, Any],
    out: Store,
    manifest: Mapping[str, Any],
    model: Store | None,
) -> None:
    mlflow_log.log_params(run_id, {section: settings})
    mlflow_log.log_metrics(run_id, figures(stage, manifest))
    tags: dict[str, Any] = {f"skinlesion.{stage}.uri": out.uri}
    decision = manifest.get("decision") or {}
    if stage == "promote":
        tags |= {"skinlesion.promoted": bool(decision.get("promoted"))}
        tags |= {"skinlesion.promotion_reason": str(decision.get("reason"))[:4000]}
    mlflow_log.set_tags(run_id, tags)
    with scratch_dir("skinlesion-mlflow-") as tmp:
        files = []
        for key in artifact_keys(manifest):
            path = tmp / stage / key
            out.get_file(key, path)
            files.append((path, str(PurePosixPath(stage, key).parent)))
        mlflow_log.log_artifacts(run_id, files)
        if stage == "promote" and decision.get("promoted") and model is not None:
            local = tmp / "champion" / MODEL_FILE
            model.get_file(MODEL_FILE, local)
            mlflow_log.register_champion(run_id, local, decision.get("version"))
