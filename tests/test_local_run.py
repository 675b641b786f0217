"""`skinlesion run`: the whole pipeline through the local executor, as `make run` runs it.

The run through S3 with the `make run` preset, its contracts and its no-op rerun are in
tests/test_learning.py (one shared run); here, a killed run and its resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from skinlesion.manifest import read_manifest
from skinlesion.storage import FileStore, get_json, open_store
from tests.runs import RUN_TIMEOUT_S, run_command, run_env

pytestmark = pytest.mark.slow


def test_killed_run_resumes_at_the_stage_where_it_stopped(tmp_path: Path) -> None:
    """Under a directory whose name has a space and a non-ASCII letter: every stage reopens
    the URIs the previous ones recorded, and none may be re-encoded."""
    root = tmp_path / "dir with space \u00e9" / "store"
    store_uri = FileStore(root).uri
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
    state = root / "runs/e2e/train/state/state.json"  # written last, after the files it names
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while not state.is_file():
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
    for stage in ("prepare", "augment", "train", "finetune", "evaluate", "promote"):
        assert (root / "runs" / "e2e" / stage / "manifest.json").is_file(), stage
    assert (root / "models" / "latest" / "manifest.json").is_file()
    assert not list(tmp_path.rglob("*%2*"))  # nothing written under an encoded name
    assert f"{store_uri}/runs/e2e/evaluate/report.html" in resumed.stdout
    # The first promotion: version 1, the champion, with its SavedModel (printed at the end).
    assert f"model version 1 (champion): SavedModel {store_uri}/models/serving/1" in resumed.stdout
    assert (root / "models" / "serving" / "1" / "saved_model.pb").is_file()
    assert (root / "models" / "serving" / "1" / "manifest.json").is_file()
    assert (root / "runs" / "e2e" / "prepare" / "data_report.json").is_file()
