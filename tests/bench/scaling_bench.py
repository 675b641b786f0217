"""Scaling benchmark: prepare + augment + phase top (feature cache on) at two data sizes.

For 2,000 and 8,000 synthetic images (600x450 JPEGs; the trees cycle through a pool of
distinct drawn images, as the prepare benchmark's), the three stage commands run one
after the other, each in its own process as on the cluster: `skinlesion prepare`
(96 px), `skinlesion augment` (the default target, scaled to the data: about 10,000 and
41,000 training images), `skinlesion train --phase top` (MobileNetV3Small from a weights
file, so its base is frozen and the pooled features are extracted once; 10 epochs on them).

Per size: each stage's wall time and peak memory (RSS summed over the stage's process
tree, sampled every 50 ms), their sum, and the largest peak. `scaling.time_ratio` is the
larger size's total time over the smaller's (4x the data: at most 4.4 allowed, i.e. no
worse than linear), `scaling.rss_ratio` the same for the peak (at most 1.3: memory must
not grow with the data). Environment: SCALING_BENCH_SIZES (default "2000,8000").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.bench.prepare_bench import draw_images, write_tree
from tests.bench.rss import PeakTreeRSS

ROOT = Path(__file__).resolve().parents[2]
SIZE = 96
BACKBONE = "mobilenetv3small"


def run_child(argv: list[str]) -> dict[str, float]:
    """Run `python -m skinlesion <argv>`: its seconds and the sampled peak tree RSS (MB)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "skinlesion", *argv, "--log-level", "WARNING"],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=env,
            cwd=ROOT,
        )
        with PeakTreeRSS(proc.pid) as rss:
            code = proc.wait()
        seconds = time.perf_counter() - start
        if code != 0:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-3000:]
            raise RuntimeError(f"skinlesion {argv[0]} failed ({code}):\n{tail}")
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(rss.peak_mb, 1)}


def _weights(path: Path) -> str:
    """A random-weights file of the base: `--weights` with it freezes the base."""
    code = (
        "import sys; from skinlesion import model; "
        f"model.save_base_weights(model.build_base('{BACKBONE}', {SIZE}), sys.argv[1])"
    )
    uri = f"{path.as_uri()}/base.weights.h5"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code, uri], check=True, env=env, cwd=ROOT)
    return uri


def one_size(tmp: Path, images: int, pool: list[bytes], weights: str) -> dict[str, Any]:
    raw, store = tmp / f"raw-{images}", tmp / f"store-{images}"
    paths = write_tree(raw, images, pool)
    prepared, augmented, trained = (store / s for s in ("prepare", "augment", "train"))
    train = [
        "train", "--phase", "top", "--train-data", str(augmented), "--val-data", str(prepared),
        "--out", str(trained), "--backbone", BACKBONE, "--weights", weights,
        "--top-epochs", "10", "--patience-loss", "100", "--patience-accuracy", "100",
        "--dense-units", "256",
    ]  # fmt: skip
    stages = {
        "prepare": run_child(
            ["prepare", "--raw", str(raw), "--out", str(prepared), "--image-size", str(SIZE)]
        ),
        "augment": run_child(["augment", "--prepared", str(prepared), "--out", str(augmented)]),
        "train": run_child(train),
    }
    manifest = json.loads((trained / "manifest.json").read_text())
    for path in paths:
        path.unlink()
    return {
        **stages,
        "train_images": manifest["train_images"],
        "features": manifest["data_path"]["features"],
        "seconds": round(sum(s["seconds"] for s in stages.values()), 1),
        "peak_rss_mb": max(s["peak_rss_mb"] for s in stages.values()),
    }


def run() -> dict[str, Any]:
    sizes = [int(s) for s in os.environ.get("SCALING_BENCH_SIZES", "2000,8000").split(",")]
    pool = draw_images(400)
    by_size: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="scaling-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        weights = _weights(tmp / "weights")
        for n in sizes:
            by_size[str(n)] = one_size(tmp, n, pool, weights)
    small, large = by_size[str(sizes[0])], by_size[str(sizes[-1])]
    return {
        "scaling": {
            "sizes": by_size,
            "mean_jpeg_kb": round(sum(map(len, pool)) / len(pool) / 1024, 1),
            "data_ratio": round(sizes[-1] / sizes[0], 2),
            "time_ratio": round(large["seconds"] / small["seconds"], 2),
            "rss_ratio": round(large["peak_rss_mb"] / small["peak_rss_mb"], 2),
        }
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
