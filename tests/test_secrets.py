"""No secret reaches any output: a whole run with canary credentials in the environment
(and a run against an S3 endpoint that refuses connections) never writes them to a log
line, a manifest, the report, a plot's metadata or any other stored byte."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from tests.runs import run_env, skinlesion_run

CANARY_KEY = "AKIACANARY7Q2WXZ9PLM"
CANARY_SECRET = "canary-secret-3f9b1c7e0d2a4b6c8e0f1a3b5c7d9e1f"
CANARY_TOKEN = "canary-session-token-5a7c9e1b3d"
CANARIES = (CANARY_KEY, CANARY_SECRET, CANARY_TOKEN)


def _env(**extra: str) -> dict[str, str]:
    return {
        **run_env(),
        "AWS_ACCESS_KEY_ID": CANARY_KEY,
        "AWS_SECRET_ACCESS_KEY": CANARY_SECRET,
        "AWS_SESSION_TOKEN": CANARY_TOKEN,
        **extra,
    }


def _leaks(text: bytes) -> list[str]:
    return [c for c in CANARIES if c.encode() in text]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_a_run_with_canary_credentials_writes_them_nowhere(tmp_path: Path) -> None:
    store = tmp_path / "store"
    short = ("--set", "train.finetune_epochs=0")  # every kind of output, one stage fewer
    done = skinlesion_run(
        store.as_uri(), "--log-level", "DEBUG", *short, run_id="canary", env=_env(), cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert not _leaks(done.stdout.encode() + done.stderr.encode())
    files = [p for p in store.rglob("*") if p.is_file()]
    kinds = {p.suffix for p in files}
    assert {".json", ".png", ".html", ".csv", ".tfrecord", ".keras"} <= kinds
    for path in files:  # manifests, logs, report, plots (with their PNG metadata), models
        assert not _leaks(path.read_bytes()), path


def test_a_failing_s3_endpoint_does_not_print_the_credentials(tmp_path: Path) -> None:
    env = _env(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{_closed_port()}",
        AWS_MAX_ATTEMPTS="1",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
    )
    done = skinlesion_run(
        "s3://canary-bucket/p", "--log-level", "DEBUG", run_id="canary", env=env, timeout=600
    )
    assert done.returncode != 0
    assert "canary-bucket" in done.stderr  # it did try, and says where
    assert not _leaks(done.stdout.encode() + done.stderr.encode())
