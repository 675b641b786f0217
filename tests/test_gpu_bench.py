"""`make gpu-bench` refuses to run without a GPU (this machine has none): it must never
report CPU figures as GPU figures."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.test_train import ROOT


def test_gpu_bench_fails_when_no_gpu_is_visible() -> None:
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("a GPU is visible: `make gpu-bench` measures it")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_BENCH_")}
    done = subprocess.run(
        [sys.executable, "-m", "tests.bench.gpu_bench"],
        env={**env, "TF_CPP_MIN_LOG_LEVEL": "3"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard only
    )
    assert done.returncode == 1
    assert "gpu-bench: error: no GPU is visible" in done.stderr
    assert not done.stdout.strip()
