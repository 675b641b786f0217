"""Input pipeline benchmark: batches of 32 images at 224x224 handed to a model, epoch after
epoch, the reference's way against the training stage's.

- reference: `ImageDataGenerator(preprocessing_function=resnet.preprocess_input)
  .flow_from_directory(target_size=(224, 224), batch_size=32)` over class folders of the
  600x450 JPEGs, decoded and resized every epoch in Python. Keras 3 keeps this class only
  in its legacy package (`keras.src.legacy.preprocessing.image`), no longer exported: it is
  the reference's own code, imported from there.
- stage: `train_inputs.Inputs` over the shards that `prepare` wrote from the same images
  (224 px JPEG records), uint8 batches (the preprocessing runs inside the model); the
  "memory" path (decoded once, then batches by index) as the stage picks it when the data
  fits, and the "stream" path (decoded every epoch) beside it.

Each side delivers EPOCHS epochs of every image; the consumer only touches each batch.
The stage's time includes decoding the shards into memory; prepare's one-time work (it
runs once per data set, not per epoch or per run) is reported beside it, not in the ratio.
Environment: INPUT_BENCH_IMAGES (default 1024; a multiple of 32, so that both sides
deliver whole batches of the same images), INPUT_BENCH_EPOCHS (default 10: a
phase of the reference procedure, up to 10 epochs).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from skinlesion import logs
from skinlesion.classes import CLASSES, NUM_CLASSES
from skinlesion.config import PrepareConfig
from skinlesion.manifest import read_result
from skinlesion.prepare import run_prepare
from skinlesion.results import PrepareResult
from skinlesion.shards import shard_count
from skinlesion.storage import FileStore
from skinlesion.train_inputs import Inputs, image_records
from tests.bench.prepare_bench import draw_images, write_tree

SIZE, BATCH = 224, 32


def _class_folders(raw: Path, dest: Path) -> int:
    """The tree's images as `dest/<dx>/<image_id>.jpg` (what flow_from_directory reads)."""
    import pandas as pd

    meta = pd.read_csv(raw / "HAM10000_metadata.csv")
    for name in CLASSES:
        (dest / name).mkdir(parents=True)
    for row in meta.itertuples():
        for part in ("HAM10000_images_part_1", "HAM10000_images_part_2"):
            src = raw / part / f"{row.image_id}.jpg"
            if src.exists():
                os.link(src, dest / row.dx / f"{row.image_id}.jpg")
    return len(meta)


def reference(folders: Path, epochs: int) -> tuple[float, int]:
    """Seconds for `epochs` epochs of flow_from_directory batches, and images seen."""
    from keras.applications.resnet import preprocess_input
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

    flow = ImageDataGenerator(preprocessing_function=preprocess_input).flow_from_directory(
        str(folders), target_size=(SIZE, SIZE), batch_size=BATCH, class_mode="categorical"
    )
    seen = 0
    start = time.perf_counter()
    for _ in range(epochs):
        for i in range(len(flow)):
            x, _ = flow[i]
            seen += len(x)
        flow.on_epoch_end()
    return time.perf_counter() - start, seen


def stage(prepared: Path, count: int, epochs: int, memory: bool) -> tuple[float, int, str]:
    """Seconds for `epochs` epochs of the stage's training batches (whole epochs)."""
    val_paths = sorted(prepared.glob("val-*.tfrecord"))
    paths = sorted(prepared.glob("train-*.tfrecord")) + val_paths
    records = image_records(paths, count, SIZE)  # every image trains here
    val_count = shard_count(
        read_result(FileStore(prepared), PrepareResult, "x")[1].shards, "val", "x"
    )
    val = image_records(val_paths, val_count, SIZE)  # loaded too (counted in the time)
    steps = math.ceil(count / BATCH)
    seen = 0
    start = time.perf_counter()
    inputs = Inputs(records, val, NUM_CLASSES, budget=(1 << 40) if memory else 0)
    for x, _ in inputs.train(BATCH, steps, list(range(epochs))):
        seen += int(x.shape[0])
    return time.perf_counter() - start, seen, inputs.path


def run() -> dict[str, Any]:
    images = int(os.environ.get("INPUT_BENCH_IMAGES", "1024"))
    if images % BATCH:
        raise ValueError(f"INPUT_BENCH_IMAGES must be a multiple of {BATCH}")
    epochs = int(os.environ.get("INPUT_BENCH_EPOCHS", "10"))
    logs.configure(level="WARNING")
    pool = draw_images(min(images, 200))
    with tempfile.TemporaryDirectory(prefix="input-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        raw = tmp / "raw"
        write_tree(raw, images, pool)
        _class_folders(raw, tmp / "folders")
        kb = sum(p.stat().st_size for p in (tmp / "folders").rglob("*.jpg")) / images / 1024
        start = time.perf_counter()
        cfg = PrepareConfig(image_size=SIZE, workers=0, val_fraction=0.2)
        run_prepare(cfg, FileStore(raw), FileStore(tmp / "prepared"))
        prepare_s = time.perf_counter() - start
        ref_s, ref_n = reference(tmp / "folders", epochs)
        mem_s, mem_n, mem_path = stage(tmp / "prepared", images, epochs, memory=True)
        stream_s, stream_n, _ = stage(tmp / "prepared", images, epochs, memory=False)
    assert ref_n == mem_n == stream_n == images * epochs, (ref_n, mem_n, stream_n)
    ref_ips, mem_ips = ref_n / ref_s, mem_n / mem_s
    return {
        "input_bench_images": images,
        "input_bench_epochs": epochs,
        "input_bench_mean_jpeg_kb": round(kb, 1),
        "input_reference_images_per_s": round(ref_ips, 1),
        "input_pipeline_images_per_s": round(mem_ips, 1),
        "input_pipeline_path": mem_path,
        "input_stream_images_per_s": round(stream_n / stream_s, 1),
        "input_prepare_once_s": round(prepare_s, 1),
        "input_pipeline_speedup": round(mem_ips / ref_ips, 2),
        "input_stream_speedup": round(stream_n / stream_s / ref_ips, 2),
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
