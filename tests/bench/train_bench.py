"""Training benchmark: the train and finetune stages with and without the feature cache.

The real stage code (`train.run_train`) on prepared synthetic data (prepare at
TRAIN_BENCH_SIZE px from 600x450 JPEGs), the default backbone ResNet152 with random
weights from a weights file (so its base is frozen in phase top as with ImageNet), 10
epochs per phase (early stopping out of reach), batch 32:

- phase top: `train.cache_features` on (pooled features extracted once, the head trains
  on them) against off (the frozen base runs on every image every epoch);
- fine-tune, both from the same phase-top model: on (the output of conv4 extracted once,
  conv5 and the head train on it) against off (the whole network forward, conv5 and the
  head backward, every epoch).

A speedup is the phase's compute, extraction included: the sum of its epochs' seconds
(training steps and validation, as the stage's history records them) plus, when cached,
the extraction's seconds (the manifest's `data_path.extract_seconds`). The whole stage's
wall time (model build, per-epoch state backups, final model, upload) is reported beside
it. Each phase runs in a fresh process, as a stage does (measured: the cached phase-top
extraction took 23.1 s after the full phase in the same process, 11.8 s in a fresh one).

800 images: a phase's one-off costs (tracing ResNet152's graph and its first call, 3.5 to
4.5 s measured, and the head's own trace) do not grow with the data, and at 400 images
they were over a quarter of the cached phase top (7.73 there, 9.33 at 800, both quiet);
a real phase top trains on tens of thousands of images.
Environment: TRAIN_BENCH_IMAGES (default 800), TRAIN_BENCH_SIZE (default 96),
TRAIN_BENCH_EPOCHS (default 10).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from skinlesion import config, logs
from skinlesion import model as model_lib
from skinlesion import train as train_lib
from skinlesion.prepare import run_prepare
from skinlesion.storage import FileStore, Store, get_json, open_store
from skinlesion.trainer import Phase
from tests.bench.prepare_bench import draw_images, write_tree


def _config(weights: str, epochs: int, cache: bool) -> config.TrainConfig:
    return dataclasses.replace(
        config.TrainConfig(),
        backbone="resnet152",
        weights=weights,
        batch_size=32,
        top_epochs=epochs,
        finetune_epochs=epochs,
        patience_loss=10_000,
        patience_accuracy=10_000,
        cache_features=cache,
    )


def _phase(
    cfg: config.TrainConfig, phase: Phase, data: Store, out: Store, init: Store | None
) -> dict[str, Any]:
    """One phase in a fresh (spawned) process; its figures."""
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        return pool.submit(
            _phase_here, cfg, phase, data.uri, out.uri, init.uri if init else None
        ).result()


def _phase_here(
    cfg: config.TrainConfig, phase: Phase, data_uri: str, out_uri: str, init_uri: str | None
) -> dict[str, Any]:
    logs.configure(level="WARNING")
    data, out = open_store(data_uri), open_store(out_uri)
    init = open_store(init_uri) if init_uri else None
    start = time.perf_counter()
    manifest = train_lib.run_train(cfg, phase, data, data, out, init_model=init)
    wall = time.perf_counter() - start
    epochs = sum(get_json(out, "history.json")["seconds"])
    extract = float(manifest["data_path"].get("extract_seconds") or 0.0)
    return {
        "compute_s": round(epochs + extract, 1),
        "epochs_s": round(epochs, 1),
        "extract_s": round(extract, 1),
        "stage_wall_s": round(wall, 1),
        "features": manifest["data_path"]["features"],
        "inputs": manifest["data_path"]["inputs"],
        "epochs_run": manifest["epochs_run"],
        "best_val_accuracy": manifest["best_val_accuracy"],
    }


def _speedup(full: dict[str, Any], cached: dict[str, Any]) -> float:
    return round(full["compute_s"] / cached["compute_s"], 2)


def run() -> dict[str, Any]:
    images = int(os.environ.get("TRAIN_BENCH_IMAGES", "800"))
    size = int(os.environ.get("TRAIN_BENCH_SIZE", "96"))
    epochs = int(os.environ.get("TRAIN_BENCH_EPOCHS", "10"))
    logs.configure(level="WARNING")
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        pool = draw_images(min(images, 200))
        write_tree(tmp / "raw", images, pool)
        kb = sum(map(len, pool)) / len(pool) / 1024
        data = FileStore(tmp / "prepared")
        run_prepare(config.PrepareConfig(image_size=size, workers=0), FileStore(tmp / "raw"), data)
        weights = f"{FileStore(tmp / 'weights').uri}/resnet152.weights.h5"
        model_lib.save_base_weights(model_lib.build_base("resnet152", size), weights)
        top = {
            cache: _phase(
                _config(weights, epochs, cache), "top", data, FileStore(tmp / f"top-{cache}"), None
            )
            for cache in (False, True)
        }
        init = FileStore(tmp / "top-True")  # both fine-tunes start from the same model
        tune = {
            cache: _phase(
                _config(weights, epochs, cache),
                "finetune",
                data,
                FileStore(tmp / f"ft-{cache}"),
                init,
            )
            for cache in (False, True)
        }
    return {
        "train_bench": {
            "images": images,
            "image_size": size,
            "epochs": epochs,
            "source_jpeg_kb": round(kb, 1),
            "backbone": "resnet152 (random weights, frozen base in phase top)",
            "top_full": top[False],
            "top_cached": top[True],
            "finetune_full": tune[False],
            "finetune_cached": tune[True],
        },
        "phase_top_speedup": _speedup(top[False], top[True]),
        "finetune_speedup": _speedup(tune[False], tune[True]),
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
