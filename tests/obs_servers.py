"""Real servers for the observability tests: a Pushgateway process, an `mlflow server`
process and stdlib HTTP receivers. The session fixtures (`pushgateway_url`, `mlflow_uri`)
are imported by tests/conftest.py; each server starts once, lazily, for the sessions
that use it."""

from __future__ import annotations

import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PUSHGATEWAY_BIN = "prometheus-pushgateway"
INSTALL_HINT = (
    "prometheus-pushgateway is not installed: run `apt-get install -y prometheus-pushgateway` "
    "(or `make setup-dev`, which installs it when apt is usable)"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def pushgateway() -> Iterator[str]:
    """A real Pushgateway on a free loopback port; yields its base URL."""
    binary = shutil.which(PUSHGATEWAY_BIN) or shutil.which(f"/usr/bin/{PUSHGATEWAY_BIN}")
    if binary is None:
        raise RuntimeError(INSTALL_HINT)
    port = free_port()
    proc = subprocess.Popen(
        [binary, f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{base}/-/ready", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError("prometheus-pushgateway did not become ready")
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# A hang guard, not a speed target: the server imports a lot (about 100 s on a loaded
# 2-core machine, a few seconds on an idle one).
MLFLOW_START_S = 300


@contextmanager
def mlflow_server(root: Path) -> Iterator[str]:
    """A real `mlflow server` (sqlite backend, local artifact root, proxied artifacts) on a
    free loopback port; yields its tracking URI. Its process group is ended afterwards."""
    mlflow = Path(sys.executable).with_name("mlflow")
    port = free_port()
    log = (root / "mlflow-server.log").open("wb")
    proc = subprocess.Popen(
        [
            str(mlflow), "server",
            "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", str(root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its workers go with it
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + MLFLOW_START_S
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    tail = (root / "mlflow-server.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"mlflow server did not start:\n{tail}") from None
                time.sleep(0.5)
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()


def scrape(base: str) -> str:
    return urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()


@dataclass
class Receiver:
    """A real HTTP server recording each POST body; answers `statuses` in turn, then 200."""

    statuses: list[int] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    url: str = ""


@contextmanager
def receiver(statuses: list[int] | None = None) -> Iterator[Receiver]:
    rec = Receiver(list(statuses or []))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            rec.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(rec.statuses.pop(0) if rec.statuses else 200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    rec.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield rec
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def pushgateway_url() -> Iterator[str]:
    with pushgateway() as base:  # fails (not skips) naming what to install
        yield base


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The tracking URI of one real `mlflow server` for the session."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri
