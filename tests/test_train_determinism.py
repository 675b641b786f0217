"""A phase resumed after epoch 1 ends exactly as an uninterrupted run: same per-epoch
metrics, same weights after every epoch (per-epoch seeds, deterministic CPU ops), on the
full path (the base trains: `weights: none`) and on cached features (a frozen base from a
weights file: the head trains on pooled features, extracted again by the resumed run)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

from skinlesion import train as train_lib
from skinlesion import train_seeds
from skinlesion import trainer as trainer_lib
from skinlesion.errors import Terminated
from skinlesion.manifest import STATE_PREFIX
from skinlesion.storage import Store, get_json, open_store
from tests.test_train import SIZE, tiny_cfg, write_prepared

METRIC_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Store:
    store = open_store(str(tmp_path_factory.mktemp("det-data") / "prepare"))
    write_prepared(store)
    return store


@pytest.fixture
def deterministic_ops() -> Iterator[None]:
    import tensorflow as tf
    from tensorflow.python.framework import config as tf_config

    tf.config.experimental.enable_op_determinism()
    try:
        yield
    finally:
        tf_config.disable_op_determinism()


def test_epoch_seeds_depend_on_seed_phase_and_epoch_only() -> None:
    seeds = {
        train_seeds.epoch_seed(s, p, e) for s in (0, 1) for p in ("top", "finetune") for e in (0, 1)
    }
    assert len(seeds) == 8
    assert train_seeds.epoch_seed(3, "top", 2) == train_seeds.epoch_seed(3, "top", 2)


@pytest.fixture(scope="module")
def frozen_weights(tmp_path_factory: pytest.TempPathFactory) -> str:
    from skinlesion import model as model_lib

    store = open_store(str(tmp_path_factory.mktemp("det-weights")))
    uri = f"{store.uri}/base.weights.h5"
    model_lib.save_base_weights(model_lib.build_base("mobilenetv3small", SIZE), uri)
    return uri


def _train(
    data: Store,
    out: Store,
    monkeypatch: pytest.MonkeyPatch,
    stop_after: int | None,
    base_weights: str = "none",
) -> list[list[np.ndarray]]:
    """Runs phase top into `out`; returns the weights after each epoch run. With
    `stop_after`, the run is preempted after that epoch (raises Terminated)."""
    weights: list[list[np.ndarray]] = []
    epoch_done = trainer_lib.Trainer.epoch_done

    def recording(self: Any, epoch: int, logs_: Any, s: float, t: float, model: Any) -> None:
        epoch_done(self, epoch, logs_, s, t, model)
        weights.append([np.array(w) for w in model.get_weights()])
        if stop_after is not None and epoch + 1 == stop_after:
            raise Terminated()

    monkeypatch.setattr(trainer_lib.Trainer, "epoch_done", recording)
    cfg = tiny_cfg(top_epochs=3, dense_units=16, steps_per_epoch=3, weights=base_weights)
    try:
        train_lib.run_train(cfg, "top", data, data, out)
    finally:
        monkeypatch.undo()
    return weights


@pytest.mark.slow
@pytest.mark.parametrize("path", ["full", "cached"])
def test_resumed_phase_matches_an_uninterrupted_one(
    data: Store,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    deterministic_ops: None,
    path: str,
    request: pytest.FixtureRequest,
) -> None:
    weights = "none" if path == "full" else request.getfixturevalue("frozen_weights")
    whole_out = open_store(str(tmp_path / "whole"))
    whole = _train(data, whole_out, monkeypatch, None, weights)

    parts_out = open_store(str(tmp_path / "parts"))
    with pytest.raises(Terminated):
        _train(data, parts_out, monkeypatch, stop_after=1, base_weights=weights)
    state = get_json(parts_out, f"{STATE_PREFIX}/state.json")
    assert state["epochs_done"] == 1
    assert state["cache"] == ("off" if path == "full" else "pooled")
    parts = _train(data, parts_out, monkeypatch, None, weights)
    manifest = get_json(parts_out, "manifest.json")
    assert manifest["resumed_from_epoch"] == 1
    assert manifest["data_path"]["features"] == state["cache"]

    assert len(whole) == 3 and len(parts) == 2
    a, b = get_json(whole_out, "history.json"), get_json(parts_out, "history.json")
    assert a["epoch"] == b["epoch"] == [1, 2, 3]
    for key in METRIC_KEYS:
        np.testing.assert_allclose(a[key], b[key], atol=1e-6, err_msg=key)
    for got, want in zip(parts, whole[1:], strict=True):
        assert len(got) == len(want)
        assert all(np.allclose(g, w, atol=1e-6) for g, w in zip(got, want, strict=True))
    # Not trivially equal: the epochs did change the weights.
    assert not all(np.allclose(g, w) for g, w in zip(whole[0], whole[2], strict=True))
