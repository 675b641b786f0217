"""Prepare benchmark: throughput against a plain PIL loop, and peak memory vs size.

- Throughput: the real prepare code path (`run_prepare`, workers=0: one per CPU,
  224 px, file store) on N synthetic 600x450 JPEGs (real-like: about 250 KB each, see
  `prepare_bench_mean_jpeg_kb`), against a one-process loop that reads each file and
  does `Image.open(...).convert("RGB").resize((224, 224))`, on the same files (the
  largest tree, where the stage's fixed costs weigh least).
- Memory: prepare runs in a child process for 2,000 and 8,000 images; its peak
  RSS is sampled from /proc over the child and its workers (summed, so shared
  pages count twice: an upper bound), and the largest single process's
  `ru_maxrss` is reported beside it.

The trees hold `unique` drawn images repeated under all the ids (decoding cost
per file is what is measured; drawing 8,000 images would dominate the run).
Environment overrides: PREPARE_BENCH_SIZES (default "2000,8000"),
PREPARE_BENCH_UNIQUE (default 400).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image

from skinlesion import synthetic
from skinlesion.ham10000 import METADATA, SYNTHETIC_MARKER
from skinlesion.imaging import available_cpus, ordered_map
from tests.bench.rss import PeakTreeRSS

SIZE = 224
_CHILD = """
import json, sys, time
from skinlesion import logs
logs.import_tensorflow()  # process start-up, not prepare work
from skinlesion.config import PrepareConfig
from skinlesion.prepare import run_prepare
from skinlesion.storage import FileStore
logs.configure(level="WARNING")
start = time.monotonic()
cfg = PrepareConfig(image_size=%d, workers=0)
m = run_prepare(cfg, FileStore(sys.argv[1]), FileStore(sys.argv[2]))
print(json.dumps({"seconds": time.monotonic() - start, "images": m["n_images"]}))
"""


def _render_chunk(specs: list[synthetic.ImageSpec]) -> list[bytes]:
    return [synthetic.render(s) for s in specs]


_DRAWN: list[bytes] = []  # the benchmarks of one `make bench` share their drawn images


def draw_images(count: int, seed: int = 0) -> list[bytes]:
    """`count` distinct synthetic JPEGs (seed 0: drawn once per process, then shared)."""
    if seed == 0 and len(_DRAWN) >= count:
        return _DRAWN[:count]
    specs = synthetic.plan(max(count, synthetic.MIN_IMAGES), seed)[:count]
    chunks = [specs[i : i + 8] for i in range(0, len(specs), 8)]
    drawn = [
        jpeg for chunk in ordered_map(_render_chunk, chunks, available_cpus()) for jpeg in chunk
    ]
    if seed == 0:
        _DRAWN[:] = drawn
    return drawn


def write_tree(root: Path, images: int, pool: list[bytes]) -> list[Path]:
    """A synthetic HAM10000 tree of `images` ids whose files cycle through `pool`."""
    specs = synthetic.plan(images, seed=1)
    root.mkdir(parents=True)
    (root / METADATA).write_bytes(synthetic.metadata_csv(specs))
    (root / SYNTHETIC_MARKER).write_text(json.dumps({"synthetic": True, "bench": True}))
    paths = []
    for i, spec in enumerate(specs):
        path = root / spec.key
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(pool[i % len(pool)])
        paths.append(path)
    return paths


def plain_loop(paths: list[Path]) -> float:
    """Images/s of the one-process baseline over the same files."""
    start = time.perf_counter()
    for path in paths:
        data = path.read_bytes()
        Image.open(io.BytesIO(data)).convert("RGB").resize((SIZE, SIZE))
    return len(paths) / (time.perf_counter() - start)


def prepare_in_child(raw: Path, out: Path) -> dict[str, Any]:
    """Run prepare in a child process: its timing and peak memory (sampled tree sum,
    and the largest process's ru_maxrss from wait4)."""
    with tempfile.TemporaryFile() as log:  # the child's stderr, shown if it fails
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD % SIZE, str(raw), str(out)],
            stdout=subprocess.PIPE,
            stderr=log,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
            cwd=Path(__file__).resolve().parents[2],
        )
        with PeakTreeRSS(proc.pid) as rss:
            _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        assert proc.stdout is not None
        output = proc.stdout.read().decode()
        if proc.returncode != 0:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-3000:]
            raise RuntimeError(f"prepare child failed ({proc.returncode}):\n{output}{tail}")
    figures = json.loads(output.strip().splitlines()[-1])
    return {**figures, "tree_rss_mb": rss.peak_mb, "max_process_rss_mb": usage.ru_maxrss / 1024}


def run() -> dict[str, Any]:
    sizes = [int(s) for s in os.environ.get("PREPARE_BENCH_SIZES", "2000,8000").split(",")]
    unique = int(os.environ.get("PREPARE_BENCH_UNIQUE", "400"))
    load_before = os.getloadavg()[0]
    start = time.monotonic()
    pool = draw_images(unique)
    draw_s = time.monotonic() - start
    results: dict[str, Any] = {
        "prepare_bench_cpus": available_cpus(),
        "prepare_bench_unique_images": unique,
        "prepare_bench_mean_jpeg_kb": round(sum(map(len, pool)) / len(pool) / 1024, 1),
        "synthetic_draw_images_per_s": round(unique / draw_s, 1),  # incl. pool start
        "prepare_peak_rss_mb": {},
        "prepare_max_process_rss_mb": {},
        "prepare_images_per_s_by_size": {},
    }
    with tempfile.TemporaryDirectory(prefix="prepare-bench-") as tmp:
        for n in sizes:
            raw = Path(tmp) / f"raw-{n}"
            paths = write_tree(raw, n, pool)
            child = prepare_in_child(raw, Path(tmp) / f"out-{n}")
            results["prepare_peak_rss_mb"][str(n)] = round(child["tree_rss_mb"], 1)
            results["prepare_images_per_s_by_size"][str(n)] = round(n / child["seconds"], 1)
            results["prepare_max_process_rss_mb"][str(n)] = round(child["max_process_rss_mb"], 1)
            if n == sizes[-1]:  # the largest: the stage's fixed costs weigh least
                results["plain_loop_images_per_s"] = round(plain_loop(paths), 1)
                results["prepare_images_per_s"] = results["prepare_images_per_s_by_size"][str(n)]
                results["prepare_speedup_images"] = n
            for path in paths:
                path.unlink()
    results["prepare_speedup"] = round(
        results["prepare_images_per_s"] / results["plain_loop_images_per_s"], 2
    )
    results["prepare_bench_load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return results


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
