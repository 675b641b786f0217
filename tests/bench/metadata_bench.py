"""`skinlesion prepare --dry-run` on a large metadata file: seconds and peak RSS."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from skinlesion import ham10000
from skinlesion.classes import CLASSES
from tests.bench.rss import PeakTreeRSS

ROOT = Path(__file__).resolve().parents[2]
ROWS = 1_000_000


def write_metadata(root: Path, rows: int) -> Path:
    """A HAM10000 tree of `rows` metadata rows (about 1.5 images per lesion), no images."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / ham10000.METADATA
    with path.open("w", encoding="utf-8", newline="") as f:
        f.write(",".join(ham10000.COLUMNS) + "\n")
        for i in range(rows):
            lesion = i * 2 // 3
            dx = CLASSES[lesion % len(CLASSES)]
            f.write(f"HAM_{lesion:07d},ISIC_{i:07d},{dx},histo,{30 + i % 50}.0,male,back\n")
    return path


def dry_run(raw: Path) -> dict[str, Any]:
    """Runs the CLI's dry run in a child; its seconds and peak RSS (MB)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "skinlesion", "prepare", "--dry-run", "--raw", str(raw)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    # Sampled from /proc: wait4's ru_maxrss would also count the pages this (by then
    # large) bench process shared with the child between fork and exec.
    with PeakTreeRSS(proc.pid) as rss:
        err = proc.stderr.read()
        proc.wait()
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(err.decode()[-2000:])
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(rss.peak_mb, 1)}


def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        write_metadata(raw, ROWS)
        return {"metadata_1m_dry_run": dry_run(raw)}
