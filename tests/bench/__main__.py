"""`make bench`: run every benchmark, print a table, write JSON to $BENCH_JSON.

Each benchmark module exposes `run() -> dict` of flat figures (maps allowed); each ratio
is measured side by side in one run on the same data, its raw figures beside it. The
headline figures are printed again, together, at the end. `python -m tests.bench NAME...`
runs only those benchmarks.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from tests.bench import (
    handoff_bench,
    input_bench,
    metadata_bench,
    prepare_bench,
    scaling_bench,
    store_bench,
    train_bench,
)

BENCHES = {
    "prepare": prepare_bench.run,
    "input": input_bench.run,
    "train": train_bench.run,
    "store": store_bench.run,
    "handoff": handoff_bench.run,
    "metadata": metadata_bench.run,
    "scaling": scaling_bench.run,
}


def _rows(prefix: str, value: Any) -> list[tuple[str, str]]:
    if isinstance(value, dict):
        return [row for k, v in value.items() for row in _rows(f"{prefix}.{k}", v)]
    if isinstance(value, float):
        return [(prefix, f"{value:.3f}")]
    return [(prefix, str(value))]


# The targets (issue: performance): key path -> (comparison, bound, what it compares).
TARGETS: dict[str, tuple[str, float, str]] = {
    "prepare_speedup": (">=", 3, "prepare_images_per_s / plain_loop_images_per_s"),
    "input_pipeline_speedup": (">=", 10, "input_pipeline / input_reference images/s"),
    "phase_top_speedup": (">=", 8, "train_bench top_full / top_cached compute_s"),
    "finetune_speedup": (">=", 3, "train_bench finetune_full / finetune_cached compute_s"),
    "store_speedup": (">=", 3, "store_mb_per_s / store_plain_mb_per_s"),
    "handoff_latency_s": ("<=", 2, "median idle handoff, S3 store"),
    "scaling.time_ratio": ("<=", 4.4, "8,000 / 2,000 images: prepare+augment+top"),
    "scaling.rss_ratio": ("<=", 1.3, "8,000 / 2,000 images: peak RSS"),
}


def _lookup(results: dict[str, Any], path: str) -> Any:
    value: Any = results
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def summary(results: dict[str, Any]) -> list[str]:
    """The headline figures against their targets, one line each."""
    lines = [f"{'figure':<24} {'value':>8}  target  {'':<4} measured as"]
    for key, (op, bound, what) in TARGETS.items():
        value = _lookup(results, key)
        if value is None:
            lines.append(f"{key:<24} {'-':>8}  {op} {bound:<4}  (not run)")
            continue
        ok = value >= bound if op == ">=" else value <= bound
        mark = "ok" if ok else "MISS"
        lines.append(f"{key:<24} {value:>8}  {op} {bound:<4} {mark:<4} {what}")
    return lines


def main() -> int:
    out = Path(os.environ.get("BENCH_JSON", "build/bench.json"))
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_at_start": round(os.getloadavg()[0], 2),
        },
    }
    started = time.monotonic()
    only = set(sys.argv[1:])
    for name, fn in BENCHES.items():
        if only and name not in only:
            continue
        start = time.monotonic()
        figures = fn()
        figures[f"{name}_bench_seconds"] = round(time.monotonic() - start, 1)
        results.update(figures)
        rows = _rows(name, figures)
        width = max(len(k) for k, _ in rows)
        print(f"\n== {name}")
        for key, value in rows:
            print(f"{key:<{width}}  {value}")
    results["machine"]["load_average_at_end"] = round(os.getloadavg()[0], 2)
    results["machine"]["bench_seconds"] = round(time.monotonic() - started, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(
        f"\n== summary ({results['machine']['bench_seconds']} s, load average "
        f"{results['machine']['load_average_at_start']} -> "
        f"{results['machine']['load_average_at_end']} on {os.cpu_count()} CPUs)"
    )
    print("\n".join(summary(results)))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
