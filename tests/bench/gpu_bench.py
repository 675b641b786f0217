"""`make gpu-bench`: ResNet152 fine-tune throughput on one GPU, images/s at 224x224.

The fine-tune phase as the stage trains it (random weights: the speed does not depend on
them): conv5 and the head trainable, BatchNorm frozen, Adam, categorical cross-entropy,
one GPU. Measured:

- full forward: images (uint8, the preprocessing inside the model) through the whole
  network, backward through conv5 and the head; float32 against mixed precision
  (bfloat16 on compute capability >= 8.0, else float16 with loss scaling), with and
  without XLA, at batch 128, then batch 64 and 256 in the best of those;
- cached conv4 features: the part the stage trains on when the cache is valid (conv5 +
  head from the stored conv4 output, float16), mixed precision, XLA on and off, batches
  64, 128, 256; beside it the one-time extraction (conv1-4 forward) and the effective
  rate of 10 epochs with the extraction counted.

The data sits on the device (one batch, repeated): this measures the model's step, not
the input pipeline (`make bench`: input_pipeline). Fails at once when no GPU is visible.
A time budget (GPU_BENCH_BUDGET_S, default 420 s) keeps the whole run under 8 minutes;
configurations it leaves out are listed as skipped. Prints JSON (also written to
$GPU_BENCH_JSON, default build/gpu-bench.json), then the table last.
Environment for a dry run of the code on CPU (figures meaningless): GPU_BENCH_ALLOW_CPU=1,
GPU_BENCH_SIZE, GPU_BENCH_STEPS, GPU_BENCH_BATCHES, GPU_BENCH_BACKBONE (e.g.
mobilenetv3small: XLA compiling ResNet152's training step on a small CPU takes long).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

STEPS = int(os.environ.get("GPU_BENCH_STEPS", "30"))  # timed steps per configuration
WARMUP = 3  # steps before timing (tracing, XLA compilation, autotuning)
SIZE = int(os.environ.get("GPU_BENCH_SIZE", "224"))
BUDGET_S = float(os.environ.get("GPU_BENCH_BUDGET_S", "420"))
BATCHES = tuple(int(b) for b in os.environ.get("GPU_BENCH_BATCHES", "64,128,256").split(","))
BACKBONE = os.environ.get("GPU_BENCH_BACKBONE", "resnet152")
EPOCHS = 10  # for the effective rate of the cached path


def _device() -> tuple[str, list[tuple[int, int]]]:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        if os.environ.get("GPU_BENCH_ALLOW_CPU") == "1":
            return "CPU (dry run: figures are not GPU figures)", []
        print("gpu-bench: error: no GPU is visible to TensorFlow", file=sys.stderr)
        raise SystemExit(1)
    details = tf.config.experimental.get_device_details(gpus[0])
    caps = [tuple(tf.config.experimental.get_device_details(g).get("compute_capability") or (0, 0))
            for g in gpus[:1]]  # fmt: skip
    return str(details.get("device_name", "GPU")), caps  # type: ignore[return-value]


def _models(policy: str) -> tuple[Any, Any, Any]:
    """(full fine-tune model, its conv4 extractor, conv5 + head on conv4 features), built
    under `policy`, sharing weights."""
    import keras

    from skinlesion import config, feature_cache
    from skinlesion import model as model_lib
    from skinlesion.train_runtime import dtype_policy

    with dtype_policy(policy):
        keras.utils.set_random_seed(0)
        net = model_lib.build_model(BACKBONE, SIZE, dense_units=1000)
        model_lib.unfreeze_block(net, model_lib.block_prefixes(BACKBONE))
        cfg = config.TrainConfig(weights="s3://b/frozen.weights.h5")  # a frozen-base plan
        cache = feature_cache.plan(cfg, "finetune", net)
        assert cache.kind == "block", cache.reason
        parts = feature_cache.build_parts(net, cache)
    return net, parts.extractor, parts.trainable


def _rate(model: Any, x: Any, y: Any, jit: bool, policy: str) -> float:
    """Images/s of `model`'s training step on one device-resident batch."""
    import keras
    import tensorflow as tf

    from skinlesion.train_runtime import dtype_policy

    with dtype_policy(policy):
        model.compile(
            optimizer=keras.optimizers.Adam(1e-4),
            loss="categorical_crossentropy",
            jit_compile=jit,
        )
    data = tf.data.Dataset.from_tensors((x, y)).repeat()
    model.fit(data, steps_per_epoch=WARMUP, epochs=1, verbose=0)  # compile, warm up
    start = time.perf_counter()
    model.fit(data, steps_per_epoch=STEPS, epochs=1, verbose=0)
    return STEPS * int(x.shape[0]) / (time.perf_counter() - start)


def _extract_rate(extractor: Any, x: Any, policy: str) -> float:
    import tensorflow as tf

    from skinlesion.train_runtime import dtype_policy

    with dtype_policy(policy):
        step = tf.function(lambda t: extractor(t, training=False), jit_compile=True)
        for _ in range(WARMUP):
            step(x)
        start = time.perf_counter()
        for _ in range(STEPS):
            out = step(x)
        _ = out.numpy()  # wait for the device
    return STEPS * int(x.shape[0]) / (time.perf_counter() - start)


def main() -> int:
    import numpy as np
    import tensorflow as tf

    from skinlesion.train_runtime import precision_policy

    started = time.monotonic()
    device, caps = _device()
    mixed = precision_policy("on", caps)
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []

    def measure(mode: str, policy: str, jit: bool, batch: int, fn: Any, *args: Any) -> float | None:
        name = f"{mode} {policy} xla={'on' if jit else 'off'} batch={batch}"
        if time.monotonic() - started > BUDGET_S:
            skipped.append(name)
            return None
        try:
            ips = float(fn(*args))
        except Exception as exc:  # out of memory at a large batch: reported, not fatal
            skipped.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            return None
        row = {"mode": mode, "precision": policy, "xla": jit, "batch": batch}
        rows.append({**row, "images_per_s": round(ips, 1)})
        print(f"gpu-bench: {name}: {ips:.1f} images/s", file=sys.stderr, flush=True)
        return ips

    rng = np.random.default_rng(0)
    labels = {b: tf.one_hot(rng.integers(0, 7, b), 7) for b in BATCHES}
    images = {
        b: tf.constant(rng.integers(0, 256, (b, SIZE, SIZE, 3), dtype=np.uint8)) for b in BATCHES
    }
    mid = BATCHES[len(BATCHES) // 2]
    best: tuple[float, str, bool] = (0.0, mixed, True)
    extract_ips: float | None = None
    for policy in ("float32", mixed):
        net, extractor, tail = _models(policy)
        for jit in (False, True):
            ips = measure(
                "full", policy, jit, mid, _rate, net, images[mid], labels[mid], jit, policy
            )
            if ips is not None and ips > best[0]:
                best = (ips, policy, jit)
        if policy != mixed:
            continue
        extract_ips = measure(
            "extract conv1-4", policy, True, mid, _extract_rate, extractor, images[mid], policy
        )
        shape = tuple(extractor.output.shape[1:])
        for jit in (True, False):
            for b in BATCHES:
                feats = tf.constant(rng.standard_normal((b, *shape)).astype("float16"))
                measure("cached conv4", policy, jit, b, _rate, tail, feats, labels[b], jit, policy)
    _, policy, jit = best
    net, _, _ = _models(policy)
    for b in BATCHES:
        if b != mid:
            measure("full", policy, jit, b, _rate, net, images[b], labels[b], jit, policy)
    full_best = max((r["images_per_s"] for r in rows if r["mode"] == "full"), default=None)
    cached_best = max(
        (r["images_per_s"] for r in rows if r["mode"] == "cached conv4"), default=None
    )
    effective = None
    if cached_best and extract_ips:
        effective = round(EPOCHS / (1 / extract_ips + EPOCHS / cached_best), 1)
    result = {
        "device": device,
        "backbone": BACKBONE,
        "image_size": SIZE,
        "mixed_precision": mixed,
        "steps_timed": STEPS,
        "rows": rows,
        "skipped": skipped,
        "best_full_images_per_s": full_best,
        "best_cached_images_per_s": cached_best,
        "extract_images_per_s": extract_ips and round(extract_ips, 1),
        f"cached_{EPOCHS}_epochs_with_extraction_images_per_s": effective,
        "seconds": round(time.monotonic() - started, 1),
    }
    out = Path(os.environ.get("GPU_BENCH_JSON", "build/gpu-bench.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"\n{BACKBONE} fine-tune, {SIZE}x{SIZE}, {device}")
    print(f"{'mode':<16} {'precision':<15} {'xla':<4} {'batch':>5} {'images/s':>10}")
    for r in rows:
        xla, ips = "on" if r["xla"] else "off", r["images_per_s"]
        print(f"{r['mode']:<16} {r['precision']:<15} {xla:<4} {r['batch']:>5} {ips:>10.1f}")
    if effective:
        print(f"cached, {EPOCHS} epochs with the extraction counted: {effective} images/s")
    for name in skipped:
        print(f"skipped: {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
