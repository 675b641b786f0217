"""Frozen layers computed once: when the cache is valid, that the cached part computes what
the full model computes, and that training on cached features ends where training on
images ends (same data, same seed: validation metrics within noise)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest

from skinlesion import feature_cache
from skinlesion import model as model_lib
from skinlesion import train as train_lib
from skinlesion.storage import Store, get_json, open_store
from skinlesion.train_inputs import LABEL_BYTES, Records
from tests.runs import skinlesion_run
from tests.test_train import SIZE, TRAIN_PER_CLASS, VAL_PER_CLASS, tiny_cfg, write_prepared


def _built(backbone: str, weights: str, phase: str) -> tuple[Any, Any]:
    cfg = tiny_cfg(backbone=backbone, weights=weights)
    net = model_lib.build_for_config(cfg, SIZE, load_weights=False)
    if phase == "finetune":
        model_lib.unfreeze_block(net, model_lib.block_prefixes(backbone))
    return cfg, net


FROZEN = "file:///nowhere/base.weights.h5"  # any weights URI: the base is frozen in phase top


@pytest.mark.parametrize(
    ("backbone", "weights", "phase", "kind", "layer"),
    [
        ("mobilenetv3small", FROZEN, "top", "pooled", "head_pool"),
        ("mobilenetv3small", "none", "top", "off", ""),  # the base trains in phase top
        ("mobilenetv3small", "none", "finetune", "block", "expanded_conv_9_add"),
        ("resnet50", FROZEN, "finetune", "block", "conv4_block6_out"),
        # 50 residual blocks: the graph walk must visit each tensor once, not each path.
        ("resnet152", FROZEN, "finetune", "block", "conv4_block36_out"),
        ("efficientnetb0", FROZEN, "finetune", "block", "block6d_add"),
        # From scratch the base runs in training mode: its drop-connect layers before
        # block7a are live, so their output is not fixed per image.
        ("efficientnetb0", "none", "finetune", "off", ""),
    ],
)
def test_the_plan_caches_only_what_is_fixed_per_image(
    backbone: str, weights: str, phase: str, kind: str, layer: str
) -> None:
    cfg, net = _built(backbone, weights, phase)
    cache = feature_cache.plan(cfg, phase, net)
    assert (cache.kind, cache.boundary) == (kind, layer), cache.reason
    assert cache.reason
    off = feature_cache.plan(dataclasses.replace(cfg, cache_features=False), phase, net)
    assert off.kind == "off" and "cache_features" in off.reason


def test_a_trainable_earlier_block_moves_the_boundary_or_voids_the_cache() -> None:
    cfg, net = _built("resnet50", FROZEN, "top")
    model_lib.unfreeze_block(net, ("conv4_block6_", "conv5_"))
    assert feature_cache.plan(cfg, "finetune", net).boundary == "conv4_block5_out"
    # A trainable layer inside a residual block: two frozen tensors enter the trainable part.
    model_lib.unfreeze_block(net, ("conv4_block6_2_conv", "conv5_"))
    cache = feature_cache.plan(cfg, "finetune", net)
    assert cache.kind == "off" and "2 tensors" in cache.reason
    model_lib.unfreeze_block(net, ("conv1_conv", "conv5_"))
    cache = feature_cache.plan(cfg, "finetune", net)
    assert cache.kind == "off" and "first layers" in cache.reason


def test_online_augmentation_before_the_backbone_voids_the_cache() -> None:
    cfg, net = _built("mobilenetv3small", FROZEN, "top")
    x = keras.layers.RandomFlip("horizontal", name="flip")(net.input)
    y = model_lib.get_base(net)(x, training=False)
    for name in model_lib.HEAD_LAYERS:
        y = net.get_layer(name)(y)
    cache = feature_cache.plan(cfg, "top", keras.Model(net.input, y))
    assert cache.kind == "off" and "flip" in cache.reason
    assert feature_cache.plan(cfg, "top", net).kind == "pooled"  # the plain one still caches


@pytest.mark.parametrize(
    ("backbone", "phase"), [("mobilenetv3small", "top"), ("resnet50", "finetune")]
)
def test_the_parts_compute_what_the_full_model_computes(backbone: str, phase: str) -> None:
    cfg, net = _built(backbone, FROZEN, phase)
    parts = feature_cache.build_parts(net, feature_cache.plan(cfg, phase, net))
    images = np.random.default_rng(0).integers(0, 256, (4, SIZE, SIZE, 3)).astype("uint8")
    full = np.asarray(net(images, training=False))
    via = np.asarray(parts.trainable(parts.extractor(images), training=False))
    np.testing.assert_allclose(via, full, atol=1e-6)
    # The trained part's weights are the full model's (shared layers), and copy back.
    assert {id(w) for w in parts.trainable.trainable_weights} <= {
        id(w) for w in net.trainable_weights
    }
    other = model_lib.build_for_config(cfg, SIZE, load_weights=False)
    assert feature_cache.copy_weights(parts.trainable, other) > 0
    names = [w.path for w in parts.trainable.trainable_weights]
    assert names


# --- training both ways ------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("cache")
    data = open_store(str(root / "prepare"))
    write_prepared(data)
    # "Pretrained" weights: a base briefly trained from scratch, so that its features carry
    # signal and both ways have something to learn.
    keras.utils.set_random_seed(3)
    pre = model_lib.build_for_config(tiny_cfg(weights="none"), SIZE)
    pre.compile(optimizer="adam", loss="categorical_crossentropy")
    paths = sorted(Path(data.uri[len("file://") :]).glob("train-*.tfrecord"))
    records = Records(tuple(paths), sum(TRAIN_PER_CLASS), (SIZE, SIZE, 3), "uint8", "jpeg")
    x, y = records.load()
    pre.fit(x, keras.utils.to_categorical(y, 7), batch_size=8, epochs=12, verbose=0)
    uri = f"{open_store(str(root / 'weights')).uri}/mnv3.weights.h5"
    model_lib.save_base_weights(model_lib.get_base(pre), uri)
    return {"data": data, "weights": uri, "root": root}


def _run(prepared: dict[str, Any], phase: str, cache: bool, tag: str, **changes: Any) -> Any:
    cfg = tiny_cfg(weights=prepared["weights"], cache_features=cache, **changes)
    root: Path = prepared["root"]
    out = open_store(str(root / f"{tag}-{phase}-{cache}"))
    init = open_store(str(root / f"{tag}-top-{cache}")) if phase == "finetune" else None
    data: Store = prepared["data"]
    return out, train_lib.run_train(cfg, phase, data, data, out, init_model=init)


@pytest.mark.slow
def test_cached_and_full_training_agree(prepared: dict[str, Any], tmp_path: Path) -> None:
    """Phase top then fine-tune, each with and without the cache, same data and seed."""
    runs: dict[tuple[str, bool], Any] = {}
    for phase in ("top", "finetune"):
        for cache in (True, False):
            runs[phase, cache] = _run(
                prepared, phase, cache, "agree", top_epochs=3, finetune_epochs=2
            )
    for phase, kind in (("top", "pooled"), ("finetune", "block")):
        (out_c, cached), (out_f, full) = runs[phase, True], runs[phase, False]
        assert cached["data_path"]["features"] == kind
        assert full["data_path"]["features"] == "off"
        assert "cache_features" in full["data_path"]["reason"]
        assert cached["data_path"]["inputs"] == full["data_path"]["inputs"] == "memory"
        a, b = get_json(out_c, "history.json"), get_json(out_f, "history.json")
        assert a["epoch"] == b["epoch"]
        # Same batches and dropout masks; only float16 storage of the features differs.
        np.testing.assert_allclose(a["val_loss"], b["val_loss"], rtol=0.05, err_msg=phase)
        # One val image is 1/18: two may flip where the classes are close.
        np.testing.assert_allclose(a["val_accuracy"], b["val_accuracy"], atol=0.12, err_msg=phase)
        assert a["val_accuracy"][-1] > 0.3, a  # both learnt: this is not chance agreeing
        assert cached["trainable_params"] == full["trainable_params"]
        # Both write the full model (base + head), loadable as any other.
        for out in (out_c, out_f):
            out.get_file("model.keras", tmp_path / phase / "model.keras")
            net = model_lib.load_model(tmp_path / phase / "model.keras")
            assert model_lib.get_base(net).name.lower() == "mobilenetv3small"
    # Phase top keeps its pooled features in its output, listed (fingerprinted) like any file.
    out_c, cached = runs["top", True]
    index = get_json(out_c, "features/index.json")
    assert index["kind"] == "pooled" and index["layer"] == "head_pool"
    listed = {k for k in cached["files"] if k.startswith("features/")}
    assert {"features/index.json", "features/train-00000.f16", "features/val-00000.f16"} <= listed
    assert sum(f["count"] for f in index["splits"]["train"]["files"]) == sum(TRAIN_PER_CLASS)
    # The stored val features are what the committed model's frozen part computes.
    out_c.get_file("model.keras", tmp_path / "m" / "model.keras")
    net = model_lib.load_model(tmp_path / "m" / "model.keras")
    pooled = keras.Model(net.inputs, net.get_layer("head_pool").output)
    raw = out_c.get_bytes("features/val-00000.f16")
    (dim,) = index["splits"]["val"]["shape"]
    rows = np.frombuffer(raw, dtype=[("label", "<u2"), ("x", "<f2", (dim,))])
    assert len(rows) == sum(VAL_PER_CLASS) and LABEL_BYTES == 2
    val = Records(
        tuple(sorted(Path(prepared["data"].uri[7:]).glob("val-*.tfrecord"))),
        sum(VAL_PER_CLASS),
        (SIZE, SIZE, 3),
        "uint8",
        "jpeg",
    )
    images, labels = val.load()
    np.testing.assert_array_equal(rows["label"], np.asarray(labels))
    want = np.asarray(pooled(images, training=False))
    np.testing.assert_allclose(rows["x"].astype(np.float32), want, rtol=2e-3, atol=2e-3)


@pytest.mark.slow
def test_a_rerun_with_the_cache_off_works_end_to_end(tmp_path: Path) -> None:
    """`skinlesion run` (tiny preset: phase top trains the whole base, fine-tune caches the
    block before the trainable one), then the same run with `train.cache_features=false`:
    the training stages rerun on the full path, the run completes."""
    store = (tmp_path / "store").as_uri()
    first = skinlesion_run(store, run_id="cache")
    assert first.returncode == 0, first.stderr[-3000:]
    runs = open_store(store).child("runs", "cache")
    assert get_json(runs.child("finetune"), "manifest.json")["data_path"]["features"] == "block"
    top = get_json(runs.child("train"), "manifest.json")["data_path"]
    assert top["features"] == "off" and "trains in phase top" in top["reason"]

    off = ("--set", "train.cache_features=false")
    again = skinlesion_run(store, *off, run_id="cache")
    assert again.returncode == 0, again.stderr[-3000:]
    events = [json.loads(line) for line in again.stderr.splitlines() if line.startswith("{")]
    steps = {e.get("event"): set() for e in events}
    for e in events:
        steps[e["event"]].add(e.get("step"))
    assert {"prepare", "augment"} <= steps["stage_skipped"]
    assert {"train", "finetune"} <= steps["stage_start"]
    finetune = get_json(runs.child("finetune"), "manifest.json")
    assert finetune["data_path"]["features"] == "off"
    assert finetune["data_path"]["reason"] == "train.cache_features is false"
    assert get_json(runs.child("evaluate"), "metrics.json")["n_images"] > 0
