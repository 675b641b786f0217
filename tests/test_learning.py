"""The `make run` setup learns from the images, not from a leak.

The same pipeline (the `cpu` preset, synthetic data) is trained twice: on the real
labels it must reach balanced accuracy >= 0.70; with the labels shuffled across
lesions (same class counts, same images) it must stay near chance (< 0.30).
Minutes each on 2 cores (marker `learning`).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from skinlesion import config
from skinlesion.storage import get_json, open_store
from skinlesion.synthetic import write_sample_data
from tests.runs import skinlesion_run

pytestmark = [pytest.mark.slow, pytest.mark.learning]


@pytest.fixture(scope="module")
def raw_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = f"file://{tmp_path_factory.mktemp('raw')}"
    write_sample_data(open_store(uri), images=config.load_pipeline("cpu").synthetic_images, seed=0)
    return uri


def _balanced_accuracy(store_uri: str, raw_uri: str, *extra: str) -> float:
    done = skinlesion_run(store_uri, "--raw", raw_uri, *extra, preset="cpu", run_id="learn")
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = get_json(open_store(store_uri), "runs/learn/evaluate/metrics.json")
    return float(metrics["balanced_accuracy"])


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


def test_cpu_preset_learns_the_synthetic_classes(raw_uri: str, tmp_path: Path) -> None:
    assert _balanced_accuracy(f"file://{tmp_path}/store", raw_uri) >= 0.70


def test_cpu_preset_on_shuffled_labels_stays_near_chance(raw_uri: str, tmp_path: Path) -> None:
    """The control trains a third as long (4 top epochs, no fine-tune): a label leak through
    the images or the split would still lift it far above chance."""
    shuffled = _shuffle_labels(raw_uri, tmp_path / "shuffled")
    short = ("--set", "train.top_epochs=4", "--set", "train.finetune_epochs=0")
    assert _balanced_accuracy(f"file://{tmp_path}/store", shuffled, *short) < 0.30
