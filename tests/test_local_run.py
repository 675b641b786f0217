"""`skinlesion run`: the whole pipeline through the local executor, as `make run` runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from skinlesion.classes import CLASSES
from skinlesion.manifest import read_manifest
from skinlesion.storage import get_json, open_store
from tests.runs import RUN_TIMEOUT_S, run_command, run_env, skinlesion_run

pytestmark = pytest.mark.slow

METRIC_KEYS = {
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "per_class",
    "confusion_matrix",
    "roc_auc_macro",
    "melanoma",
    "ece",
    "n_images",
}


def _run(store: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return skinlesion_run(store, *extra)


def test_run_through_s3_commits_every_stage_then_rerun_only_reports(s3_uri: str) -> None:
    first = _run(s3_uri)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "SYNTHETIC" in first.stderr  # says it made up the data
    assert "balanced accuracy" in first.stdout
    assert f"{s3_uri}/runs/e2e/evaluate/report.html" in first.stdout

    store = open_store(s3_uri)
    for stage in ("prepare", "augment", "train", "finetune", "evaluate", "promote"):
        assert read_manifest(store.child("runs", "e2e", stage)) is not None, stage
    metrics = get_json(store, "runs/e2e/evaluate/metrics.json")
    assert set(metrics) == METRIC_KEYS
    assert set(metrics["per_class"]) == set(CLASSES)
    assert store.exists("runs/e2e/evaluate/report.html")
    assert read_manifest(store.child("models", "latest")) is not None  # first model promoted

    again = _run(s3_uri)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("stage_skipped") == 6
    assert "stage_start" not in again.stderr
    assert again.stdout.split("run e2e:")[1].count("skipped") == 6


def test_killed_run_resumes_at_the_stage_where_it_stopped(tmp_path: Path) -> None:
    store_uri = f"file://{tmp_path}/store"
    env = run_env()
    cmd = run_command(
        store_uri,
        # Enough epochs that the kill (at the first saved epoch) lands mid-training.
        *("--set", "train.top_epochs=10"),
        *("--set", "train.patience_loss=10"),
        *("--set", "train.patience_accuracy=10"),
    )
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    state = tmp_path / "store/runs/e2e/train/state"
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while not (state.is_dir() and any(state.iterdir())):
            assert proc.poll() is None, "the run ended before training saved any state"
            assert time.monotonic() < deadline, "no training state in time"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its stage process, no cleanup
        proc.wait()
    store = open_store(store_uri)
    assert read_manifest(store.child("runs", "e2e", "augment")) is not None
    assert read_manifest(store.child("runs", "e2e", "train")) is None

    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    lines = [json.loads(x) for x in resumed.stderr.splitlines() if x.startswith("{")]
    skipped = [x["step"] for x in lines if x.get("event") == "stage_skipped"]
    assert skipped == ["prepare", "augment"]
    assert any(x.get("event") == "resuming" for x in lines)
    history = get_json(store, "runs/e2e/train/history.json")
    assert history
