"""The `make run` setup end to end: it commits every stage, reruns as a no-op, and learns
from the images, not from a leak.

One run of the `cpu` preset (what `make run` runs) on synthetic data it writes itself,
through the real SeaweedFS S3 server, is shared by the tests of this module: every stage
committed, the contracts kept, a rerun only reports, and balanced accuracy >= 0.70. A
control trains the same setup with the labels shuffled across lesions (same class counts,
same images) and must stay near chance (< 0.30). Minutes on 2 cores (marker `learning`).
"""

from __future__ import annotations

import io
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from skinlesion import logs
from skinlesion.classes import CLASSES
from skinlesion.manifest import read_manifest
from skinlesion.storage import get_json, open_store
from tests import s3server
from tests.runs import run_env, skinlesion_run

pytestmark = [pytest.mark.slow, pytest.mark.learning]

RUN_ID = "learn"
STAGES = ("prepare", "augment", "train", "finetune", "evaluate", "promote")
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
    "intervals",
}


@pytest.fixture(scope="module")
def make_run(s3_server: s3server.S3Server) -> tuple[str, subprocess.CompletedProcess[str]]:
    """`skinlesion run --preset cpu` on an empty S3 prefix: (store URI, finished process)."""
    store = f"s3://{s3_server.bucket}/learn-{uuid.uuid4().hex[:12]}"
    env = {k: v for k, v in run_env().items() if k != logs.TF_LOG_LEVEL}  # as `make run`
    done = skinlesion_run(store, preset="cpu", run_id=RUN_ID, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return store, done


def _balanced_accuracy(store_uri: str) -> float:
    metrics = get_json(open_store(store_uri), f"runs/{RUN_ID}/evaluate/metrics.json")
    return float(metrics["balanced_accuracy"])


def test_make_run_commits_every_stage_and_keeps_the_contracts(
    make_run: tuple[str, subprocess.CompletedProcess[str]],
) -> None:
    store_uri, first = make_run
    assert "SYNTHETIC" in first.stderr  # says it made up the data
    for noise in ("cuInit", "cuda drivers", "absl::InitializeLog", "oneDNN"):  # no stage's
        assert noise not in first.stderr, noise
    assert "balanced accuracy" in first.stdout
    assert f"{store_uri}/runs/{RUN_ID}/evaluate/report.html" in first.stdout
    store = open_store(store_uri)
    for stage in STAGES:
        assert read_manifest(store.child("runs", RUN_ID, stage)) is not None, stage
    metrics = get_json(store, f"runs/{RUN_ID}/evaluate/metrics.json")
    assert set(metrics) == METRIC_KEYS
    assert set(metrics["per_class"]) == set(CLASSES)
    assert store.exists(f"runs/{RUN_ID}/evaluate/report.html")
    assert read_manifest(store.child("models", "latest")) is not None  # first model promoted


def test_make_run_learns_the_synthetic_classes(
    make_run: tuple[str, subprocess.CompletedProcess[str]],
) -> None:
    assert _balanced_accuracy(make_run[0]) >= 0.70


def test_rerun_only_reports(make_run: tuple[str, subprocess.CompletedProcess[str]]) -> None:
    again = skinlesion_run(make_run[0], preset="cpu", run_id=RUN_ID)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("stage_skipped") == len(STAGES)
    assert "stage_start" not in again.stderr
    assert again.stdout.split(f"run {RUN_ID}:")[1].count("skipped") == len(STAGES)


def _shuffle_labels(raw_uri: str, dest: Path) -> str:
    """A copy of the tree whose lesions carry a random permutation of their labels."""
    src, out = open_store(raw_uri), open_store(f"file://{dest}")
    meta = pd.read_csv(io.BytesIO(src.get_bytes("HAM10000_metadata.csv")))
    lesions = meta.drop_duplicates("lesion_id")[["lesion_id", "dx"]]
    rng = np.random.default_rng(7)
    shuffled = dict(
        zip(lesions["lesion_id"], rng.permutation(lesions["dx"].to_numpy()), strict=True)
    )
    original = meta["dx"].copy()
    meta["dx"] = meta["lesion_id"].map(shuffled)
    assert (meta["dx"] != original).mean() > 0.3  # most images changed class
    out.put_bytes("HAM10000_metadata.csv", meta.to_csv(index=False).encode())
    for obj in src.list():
        if obj.key != "HAM10000_metadata.csv":
            out.put_bytes(obj.key, src.get_bytes(obj.key))
    return out.uri


def test_shuffled_labels_stay_near_chance(
    make_run: tuple[str, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    """The same images with lesion labels permuted. The control trains far less (4 top
    epochs on about a third of the augmented images, no fine-tune): a label leak through
    the images or the split would still lift it far above chance."""
    shuffled = _shuffle_labels(f"{make_run[0]}/raw/HAM10000", tmp_path / "shuffled")
    store = f"file://{tmp_path}/store"
    short = (
        *("--set", "train.top_epochs=4", "--set", "train.finetune_epochs=0"),
        *("--set", "augment.scale_to_data=false", "--set", "augment.target_per_class=300"),
    )
    done = skinlesion_run(store, "--raw", shuffled, *short, preset="cpu", run_id=RUN_ID)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _balanced_accuracy(store) < 0.30
