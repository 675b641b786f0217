"""`make bench`: run every benchmark, print a table, write JSON to $BENCH_JSON.

Each benchmark module exposes `run() -> dict` of flat figures (maps allowed).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from tests.bench import handoff_bench, metadata_bench, prepare_bench

BENCHES = {
    "prepare": prepare_bench.run,
    "handoff": handoff_bench.run,
    "metadata": metadata_bench.run,
}


def _rows(prefix: str, value: Any) -> list[tuple[str, str]]:
    if isinstance(value, dict):
        return [row for k, v in value.items() for row in _rows(f"{prefix}.{k}", v)]
    if isinstance(value, float):
        return [(prefix, f"{value:.3f}")]
    return [(prefix, str(value))]


def main() -> int:
    out = Path(os.environ.get("BENCH_JSON", "build/bench.json"))
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
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
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
