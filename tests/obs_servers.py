"""Real servers for the observability tests: a Pushgateway process and stdlib HTTP receivers."""

from __future__ import annotations

import http.server
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

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
