"""Train and fine-tune stages: frozen layers, block unfreezing, weights, resume after kill."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
from PIL import Image
from sklearn.utils.class_weight import compute_class_weight

from skinlesion import config, shards, train_data
from skinlesion import model as model_lib
from skinlesion import train as train_lib
from skinlesion import trainer as trainer_lib
from skinlesion.classes import CLASSES
from skinlesion.errors import InputError, Terminated
from skinlesion.manifest import STATE_PREFIX, claim, commit_stage
from skinlesion.results import PrepareResult
from skinlesion.storage import Store, get_json, open_store, put_json
from tests.stage_results import prepare_result

SIZE = 32
# Imbalanced on purpose (nv largest), so that class weights are not all 1.
TRAIN_PER_CLASS = (4, 6, 8, 3, 6, 14, 3)
VAL_PER_CLASS = (2, 2, 3, 2, 2, 5, 2)
ROOT = Path(__file__).resolve().parents[1]


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_prepared(store: Store, seed: int = 0) -> dict[str, Any]:
    """A committed prepare-like output: class-coloured noisy squares in train/val shards."""
    rng = np.random.default_rng(seed)
    colours = rng.uniform(40, 215, (len(CLASSES), 3))

    def body(work: Path) -> PrepareResult:
        out = {}
        for split, per_class in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
            with shards.ShardWriter(work, split, shard_size=25) as writer:
                for label, n in enumerate(per_class):
                    for i in range(n):
                        noise = rng.normal(0, 30, (SIZE, SIZE, 3))
                        pixels = np.clip(colours[label] + noise, 0, 255).astype(np.uint8)
                        writer.write(
                            shards.Example(
                                _jpeg(pixels), label, f"I{split}{label}_{i}", f"L{split}{label}_{i}"
                            )
                        )
            out[split] = writer.shards
        return prepare_result(out, SIZE)

    return commit_stage("prepare", store, {"test_data": seed}, {}, body)


def tiny_cfg(**changes: Any) -> config.TrainConfig:
    base = dataclasses.replace(
        config.load_pipeline("tiny").train,
        dense_units=16,
        top_epochs=2,
        finetune_epochs=2,
        patience_loss=50,
        patience_accuracy=50,
    )
    return dataclasses.replace(base, **changes)


def weights_of(net: Any) -> dict[str, list[np.ndarray]]:
    """Base layer name -> its weights (numpy), plus the head layers."""
    out = {
        layer.name: [np.array(w) for w in layer.get_weights()]
        for layer in model_lib.get_base(net).layers
        if layer.weights
    }
    for name in model_lib.HEAD_LAYERS:
        layer = net.get_layer(name)
        if layer.weights:
            out[name] = [np.array(w) for w in layer.get_weights()]
    return out


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def load_output_model(store: Store, tmp: Path) -> Any:
    store.get_file("model.keras", tmp / "model.keras")
    return model_lib.load_model(tmp / "model.keras")


# --- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Store:
    store = open_store(str(tmp_path_factory.mktemp("train-data") / "prepare"))
    write_prepared(store)
    return store


@pytest.fixture(scope="module")
def top_run(data: Store, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Phase top from a base weights file in the store (the air-gapped ImageNet path)."""
    root = tmp_path_factory.mktemp("top")
    store = open_store(str(root / "store"))
    # "Pretrained" weights: a base briefly trained from scratch, so that its features
    # (and BatchNorm statistics) carry signal the head and the block can use.
    keras.utils.set_random_seed(7)
    pre = model_lib.build_for_config(tiny_cfg(weights="none"), SIZE)
    pre.compile(optimizer="adam", loss="categorical_crossentropy")
    paths = sorted(Path(data.uri[len("file://") :]).glob("train-*.tfrecord"))
    pre.fit(
        shards.dataset(paths, 7, 8, shuffle=True, repeat=True),
        steps_per_epoch=80,
        epochs=1,
        verbose=0,
    )
    source = model_lib.get_base(pre)
    uri = f"{store.uri}/weights/mnv3.weights.h5"
    model_lib.save_base_weights(source, uri)
    # A weak top phase (tiny learning rate) leaves fine-tuning something to improve.
    cfg = tiny_cfg(weights=uri, top_learning_rate=1e-5)
    out = store.child("runs", "t", "train")
    manifest = train_lib.run_train(cfg, "top", data, data, out)
    return {
        "cfg": cfg,
        "out": out,
        "manifest": manifest,
        "source": {
            layer.name: [np.array(w) for w in layer.get_weights()]
            for layer in source.layers
            if layer.weights
        },
        "tmp": root,
    }


# --- tests ----------------------------------------------------------------------------


def test_balanced_class_weights_match_sklearn() -> None:
    counts = [5, 0, 12, 3, 7, 60, 1]
    labels = np.repeat(np.arange(7), counts)
    present = np.unique(labels)
    expected = compute_class_weight("balanced", classes=present, y=labels)
    got = train_data.balanced_class_weights(counts)
    assert sorted(got) == list(present)
    np.testing.assert_allclose([got[int(c)] for c in present], expected)


@pytest.mark.slow
def test_top_phase_trains_head_only_and_commits(top_run: dict[str, Any], data: Store) -> None:
    manifest, out, tmp = top_run["manifest"], top_run["out"], top_run["tmp"]
    assert manifest["stage"] == "train" and manifest["phase"] == "top"
    assert manifest["backbone"] == "mobilenetv3small"
    assert manifest["weights"] == top_run["cfg"].weights
    assert manifest["image_size"] == SIZE
    assert manifest["epochs_run"] == 2 and manifest["resumed_from_epoch"] is None
    assert manifest["best_epoch"] in (1, 2) and 0 <= manifest["best_val_accuracy"] <= 1
    assert manifest["images_per_s"] > 0
    assert {
        "model.keras",
        "history.json",
        "training_curves.png",
        "config.json",
        train_lib.BEST_CKPT,
    } <= set(manifest["files"])
    assert not out.list(STATE_PREFIX), "resume state must go once committed"
    # Class imbalance: prepare data (not augment) gets sklearn's balanced weights.
    labels = np.repeat(np.arange(7), TRAIN_PER_CLASS)
    expected = compute_class_weight("balanced", classes=np.arange(7), y=labels)
    got = [manifest["class_weights"][c] for c in CLASSES]
    np.testing.assert_allclose(got, expected, rtol=1e-3)

    history = get_json(out, "history.json")
    assert history["epoch"] == [1, 2]
    assert len(history["val_accuracy"]) == 2 and len(history["loss"]) == 2
    assert manifest["best_val_accuracy"] == pytest.approx(max(history["val_accuracy"]))

    net = load_output_model(out, tmp)
    got_w = weights_of(net)
    # The frozen base is exactly the weights file, BatchNorm statistics included.
    for name, expected_w in top_run["source"].items():
        assert same(got_w[name], expected_w), f"base layer {name} changed in phase top"
    # The head learnt (its biases start at zero).
    for name in ("head_dense", "predictions"):
        assert np.abs(got_w[name][1]).max() > 0, f"{name} did not train"
    head_params = sum(
        int(np.prod(w.shape)) for n in ("head_dense", "predictions") for w in got_w[n]
    )
    assert manifest["trainable_params"] == head_params

    # Same inputs and settings: the committed stage is not redone.
    again = train_lib.run_train(top_run["cfg"], "top", data, data, out)
    assert again["created_at"] == manifest["created_at"]
    assert again["fingerprint"] == manifest["fingerprint"]


@pytest.mark.slow
def test_finetune_trains_only_the_named_block(top_run: dict[str, Any], data: Store) -> None:
    cfg = dataclasses.replace(top_run["cfg"], finetune_learning_rate=0.005)
    out = open_store(top_run["out"].uri.rsplit("/", 1)[0] + "/finetune")
    manifest = train_lib.run_train(cfg, "finetune", data, data, out, init_model=top_run["out"])
    assert manifest["stage"] == "finetune" and manifest["phase"] == "finetune"
    assert manifest["epochs_run"] == 2
    assert "training_curves.png" in manifest["files"]
    # Starts from the top model: the output is never worse on val than the init model.
    assert manifest["best_val_accuracy"] >= top_run["manifest"]["best_val_accuracy"]

    prefixes = model_lib.block_prefixes("mobilenetv3small")
    top = weights_of(load_output_model(top_run["out"], top_run["tmp"] / "top"))
    ft_net = load_output_model(out, top_run["tmp"] / "ft")
    tuned = weights_of(ft_net)
    base = model_lib.get_base(ft_net)
    bn = {layer.name for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)}
    in_block = {n for n in tuned if n.startswith(prefixes) and n not in bn}
    assert in_block, "the block has trainable layers"
    for name in tuned:
        if name in in_block or name in model_lib.HEAD_LAYERS:
            continue
        assert same(tuned[name], top[name]), f"{name} is outside the block but changed"
    changed = {n for n in in_block if not same(tuned[n], top[n])}
    # The weak top phase leaves room: a fine-tuned epoch is the output, not the init model.
    assert manifest["best_epoch"] >= 1
    assert changed == in_block, f"block layers unchanged: {in_block - changed}"
    block_params = sum(
        int(np.prod(w.shape)) for n in (*in_block, "head_dense", "predictions") for w in tuned[n]
    )
    assert manifest["trainable_params"] == block_params
    curves = get_json(out, "history.json")
    assert curves["phase"] == "finetune" and curves["epoch"] == [1, 2]


@pytest.mark.slow
def test_interrupted_finetune_resumes_and_keeps_the_init_model_when_nothing_beats_it(
    top_run: dict[str, Any], data: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Preempted after epoch 1 (in-process SIGTERM), resumed: no fine-tuned epoch beats the
    top model (learning rate ~0), so the output is the top model itself, not the last
    weights."""
    cfg = dataclasses.replace(top_run["cfg"], finetune_learning_rate=1e-9)
    out = open_store(top_run["out"].uri.rsplit("/", 1)[0] + "/ft-resume")
    epoch_done = trainer_lib.Trainer.epoch_done

    def preempted_after_first_epoch(self: Any, epoch: int, *args: Any) -> None:
        epoch_done(self, epoch, *args)
        raise Terminated()

    monkeypatch.setattr(trainer_lib.Trainer, "epoch_done", preempted_after_first_epoch)
    with pytest.raises(Terminated):
        train_lib.run_train(cfg, "finetune", data, data, out, init_model=top_run["out"])
    monkeypatch.undo()
    state = get_json(out, f"{STATE_PREFIX}/state.json")
    assert state["epochs_done"] == 1 and state["best_epoch"] == 0
    assert state["best_key"] and state["model_key"].startswith(f"{STATE_PREFIX}/sigterm-")
    assert not out.exists("manifest.json")

    manifest = train_lib.run_train(cfg, "finetune", data, data, out, init_model=top_run["out"])
    assert manifest["resumed_from_epoch"] == 1 and manifest["epochs_run"] == 2
    assert manifest["best_epoch"] == 0
    assert manifest["best_val_accuracy"] == top_run["manifest"]["best_val_accuracy"]
    top = weights_of(load_output_model(top_run["out"], top_run["tmp"] / "top2"))
    tuned = weights_of(load_output_model(out, top_run["tmp"] / "ft-resume"))
    assert tuned.keys() == top.keys()
    assert all(same(tuned[name], top[name]) for name in top)


@pytest.mark.slow
def test_finetune_rejects_a_mismatched_init_model_or_block(
    top_run: dict[str, Any], data: Store
) -> None:
    root = top_run["out"].uri.rsplit("/", 1)[0]
    bad_backbone = dataclasses.replace(top_run["cfg"], backbone="efficientnetb0")
    with pytest.raises(InputError, match="has backbone 'mobilenetv3small'"):
        train_lib.run_train(
            bad_backbone,
            "finetune",
            data,
            data,
            open_store(root + "/ft-bad1"),
            init_model=top_run["out"],
        )
    bad_block = dataclasses.replace(top_run["cfg"], finetune_block="conv9_")
    with pytest.raises(InputError, match="'conv9_' matches no layer"):
        train_lib.run_train(
            bad_block,
            "finetune",
            data,
            data,
            open_store(root + "/ft-bad2"),
            init_model=top_run["out"],
        )
    with pytest.raises(InputError, match="needs init_model"):
        train_lib.run_train(top_run["cfg"], "finetune", data, data, open_store(root + "/x"))


@pytest.mark.slow
def test_weights_none_trains_the_base_and_stale_state_is_dropped(
    data: Store, tmp_path: Path
) -> None:
    out = open_store(str(tmp_path / "train"))
    # Resume state of other settings (an older attempt of this stage): must not be used.
    claim("train", out)
    put_json(out, f"{STATE_PREFIX}/state.json", {"fingerprint": "0" * 64, "epochs_done": 5})
    out.put_bytes(f"{STATE_PREFIX}/epoch-0005.keras", b"old")
    cfg = tiny_cfg(weights="none", top_epochs=1)
    manifest = train_lib.run_train(cfg, "top", data, data, out)
    assert manifest["resumed_from_epoch"] is None and manifest["epochs_run"] == 1
    assert not out.list(STATE_PREFIX)
    net = load_output_model(out, tmp_path)
    base = model_lib.get_base(net)
    bns = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    # Trained from scratch: BatchNorm betas (initialised to 0) and statistics moved.
    assert any(np.abs(np.array(layer.beta)).max() > 0 for layer in bns)
    assert any(np.abs(np.array(layer.moving_mean)).max() > 0 for layer in bns)
    assert manifest["trainable_params"] > 100_000  # far more than the 16-unit head


# --- preemption: the stage as a separate process ----------------------------------------


def _train_cmd(data: Store, out_uri: str, epochs: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "skinlesion", "train", "--phase", "top",
        "--train-data", data.uri, "--val-data", data.uri, "--out", out_uri,
        "--backbone", "mobilenetv3small", "--weights", "none", "--batch-size", "8",
        "--dense-units", "16", "--top-epochs", str(epochs), "--steps-per-epoch", "12",
        "--patience-loss", "50", "--patience-accuracy", "50", "--run-id", "resume-test",
        *extra,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}


def _wait_for_state(proc: subprocess.Popen[bytes], out: Store, epochs: int, limit: float) -> int:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"training exited early with {proc.returncode}")
        if out.exists(f"{STATE_PREFIX}/state.json"):
            done = int(get_json(out, f"{STATE_PREFIX}/state.json")["epochs_done"])
            if done >= epochs:
                return done
        time.sleep(0.2)
    proc.kill()
    pytest.fail("no resume state in the store in time")


def _events(stderr: bytes) -> list[dict[str, Any]]:
    events = []
    for line in stderr.decode(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events


@pytest.mark.slow
def test_resume_after_killed_training_process(data: Store, s3_uri: str, tmp_path: Path) -> None:
    """SIGKILL (no chance to clean up) mid-run; the rerun continues the epochs, on S3."""
    epochs = 5
    out_uri = f"{s3_uri}/runs/r1/train"
    out = open_store(out_uri)
    log = (tmp_path / "first.log").open("wb")  # a file: a full pipe would block the child
    first = subprocess.Popen(
        _train_cmd(data, out_uri, epochs),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        seen = _wait_for_state(first, out, 1, limit=900)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
        log.close()
    assert first.returncode == -signal.SIGKILL
    assert not out.exists("manifest.json")
    killed_at = int(get_json(out, f"{STATE_PREFIX}/state.json")["epochs_done"])
    assert seen <= killed_at < epochs

    second = subprocess.run(
        _train_cmd(data, out_uri, epochs),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=1200,  # a hang guard only: a loaded 2-core machine is slow
    )
    events = _events(second.stderr)
    assert second.returncode == 0, second.stderr.decode()[-3000:]
    resuming = [e for e in events if e.get("event") == "resuming"]
    assert len(resuming) == 1 and resuming[0]["epoch"] == killed_at
    trained = [e["epoch"] for e in events if e.get("event") == "epoch"]
    assert trained == list(range(killed_at + 1, epochs + 1)), "epochs restarted"
    saved = [e for e in events if e.get("event") == "state_saved"]  # one line per backup
    assert [e["tag"] for e in saved] == [f"epoch-{n:04d}" for n in trained]
    assert all(e["megabytes"] > 0 and e["seconds"] >= 0 for e in saved)
    manifest = get_json(out, "manifest.json")
    assert manifest["resumed_from_epoch"] == killed_at
    assert manifest["epochs_run"] == epochs
    history = get_json(out, "history.json")
    assert history["epoch"] == list(range(1, epochs + 1))
    assert not out.list(STATE_PREFIX)


@pytest.mark.slow
def test_sigterm_saves_state_and_the_rerun_resumes(data: Store, tmp_path: Path) -> None:
    """SIGTERM (pod eviction) mid-run saves the state; here with a cosine learning-rate
    schedule, whose position lives in the saved optimizer."""
    epochs = 4
    out_uri = (tmp_path / "train").as_uri()
    out = open_store(out_uri)
    cmd = _train_cmd(data, out_uri, epochs, "--lr-schedule", "cosine")
    log = (tmp_path / "first.log").open("wb")  # a file: a full pipe would block the child
    first = subprocess.Popen(
        cmd,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        _wait_for_state(first, out, 1, limit=900)
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
        log.close()
    stderr = (tmp_path / "first.log").read_bytes()
    assert first.returncode == 143, stderr.decode()[-3000:]
    saved = [e for e in _events(stderr) if e.get("event") == "saving_state_on_sigterm"]
    assert len(saved) == 1
    state = get_json(out, f"{STATE_PREFIX}/state.json")
    assert state["best_key"] and state["model_key"].startswith(f"{STATE_PREFIX}/sigterm-")
    assert out.exists(state["model_key"]) and not out.exists("manifest.json")
    done = int(state["epochs_done"])
    assert done == saved[0]["epochs_done"] and 1 <= done < epochs

    second = subprocess.run(
        cmd,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=1200,  # a hang guard only: a loaded 2-core machine is slow
    )
    assert second.returncode == 0, second.stderr.decode()[-3000:]
    resuming = [e for e in _events(second.stderr) if e.get("event") == "resuming"]
    assert resuming and resuming[0]["epoch"] == done
    assert get_json(out, "history.json")["epoch"] == list(range(1, epochs + 1))
    assert get_json(out, "manifest.json")["settings"]["lr_schedule"] == "cosine"


_MIRRORED = """
import dataclasses, json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import contextlib
from skinlesion import logs, train, train_runtime, trainer
from skinlesion.errors import Terminated
from skinlesion.storage import open_store
from tests.test_train import tiny_cfg

@contextlib.contextmanager
def two_replicas(cfg, cluster=None):  # what select_runtime picks with two GPUs, on two CPUs
    with train_runtime.dtype_policy("float32"):
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        yield train_runtime.Runtime(strategy, gpus=0, precision="float32", jit_compile=False)

train_runtime.select_runtime = two_replicas
logs.configure()
data, out = open_store(sys.argv[1]), open_store(sys.argv[2])
cfg = dataclasses.replace(tiny_cfg(), top_epochs=2, batch_size=5)  # uneven last batches
epoch_done = trainer.Trainer.epoch_done
def preempted(self, epoch, *args):
    epoch_done(self, epoch, *args)
    raise Terminated()
trainer.Trainer.epoch_done = preempted
try:
    train.run_train(cfg, "top", data, data, out)
except Terminated:
    trainer.Trainer.epoch_done = epoch_done
print(json.dumps(train.run_train(cfg, "top", data, data, out)))
"""


@pytest.mark.slow
def test_mirrored_strategy_trains_and_resumes(data: Store, tmp_path: Path) -> None:
    """The multi-GPU path (MirroredStrategy) on two CPU devices, uneven last batches included;
    preempted after epoch 1 and resumed in the same process."""
    out = open_store(str(tmp_path / "train"))
    proc = subprocess.run(
        [sys.executable, "-c", _MIRRORED, data.uri, out.uri],
        env=_env(),
        cwd=ROOT,
        capture_output=True,
        timeout=1200,  # a hang guard only: a loaded 2-core machine is slow
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    manifest = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert manifest["replicas"] == 2
    assert manifest["batch_size"] == 6  # 5 rounded up to split evenly over 2 replicas
    assert manifest["resumed_from_epoch"] == 1 and manifest["epochs_run"] == 2
