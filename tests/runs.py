"""The `skinlesion run` subprocess call that the end-to-end tests share."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

# A hang guard, not a speed target: a busy 2-core machine may take many minutes.
RUN_TIMEOUT_S = 2400


def run_command(store: str, *extra: str, preset: str = "tiny", run_id: str = "e2e") -> list[str]:
    return [
        sys.executable, "-m", "skinlesion", "run", "--store", store,
        "--preset", preset, "--run-id", run_id, *extra,
    ]  # fmt: skip


def run_env() -> dict[str, str]:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def skinlesion_run(
    store: str, *extra: str, preset: str = "tiny", run_id: str = "e2e", **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """Run the whole pipeline in a child process; its output captured as text."""
    return subprocess.run(
        run_command(store, *extra, preset=preset, run_id=run_id),
        env=kwargs.pop("env", None) or run_env(),
        capture_output=True,
        text=True,
        timeout=kwargs.pop("timeout", RUN_TIMEOUT_S),
        **kwargs,
    )
