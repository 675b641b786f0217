"""The Docker engine and the skinlesion image, for the image and pods tests.

The engine is Debian's `docker.io` (its `/usr/bin/docker` client has BuildKit built in),
started by `make docker-engine` (dockerd with host networking only; root). The image is
built by `make image` on the Debian-built base (`make base-image`), so the tests build it
exactly as a user does, layer cache kept between runs. Nothing here skips: a machine
without an engine fails the tests with what to install.

The build passes a CA bundle as `PIP_CERT`: the one pip needs here ($PIP_CERT or the
system's) plus a canary certificate (tests/data/pip-cert-canary.pem, a throwaway
self-signed certificate whose key was discarded), so that tests/test_image.py can grep the
image's layers and history for it. The canary is fixed, so the layers of any build the
tests ran (a fresh clone's cold build included) are checked, not only this session's.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CANARY = Path(__file__).resolve().parent / "data" / "pip-cert-canary.pem"
INSTALL_HINT = (
    "install Debian's Docker engine and debootstrap (as root: apt-get install -y docker.io "
    "debootstrap), then start the engine (as root: make docker-engine)"
)
BUILD_TIMEOUT_S = 3600  # a hang guard: a cold build downloads and installs TensorFlow
CALL_TIMEOUT_S = 300


class DockerUnavailable(RuntimeError):
    """No usable Docker engine or image: the message says what to install or run."""


def client() -> str:
    """Debian's client first (BuildKit built in); a bare client elsewhere may lack buildx."""
    for path in ("/usr/bin/docker", shutil.which("docker")):
        if path and os.access(path, os.X_OK):
            return path
    raise DockerUnavailable(f"no docker client: {INSTALL_HINT}")


def docker(
    *args: str,
    check: bool = True,
    timeout: float = CALL_TIMEOUT_S,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """One docker CLI call, output captured as text; a failure names the command."""
    done = subprocess.run(
        [client(), *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:3])} …: exit {done.returncode}\n{done.stderr}")
    return done


def require_engine() -> None:
    """The engine answers, started here when it is not running and we may (`make docker-engine`)."""
    client()
    if subprocess.run([client(), "info"], capture_output=True).returncode == 0:
        return
    started = subprocess.run(
        ["make", "-s", "docker-engine"], cwd=ROOT, capture_output=True, text=True
    )
    if started.returncode != 0:
        raise DockerUnavailable(
            f"the Docker engine is not running and could not be started "
            f"({started.stderr.strip() or started.stdout.strip()}): {INSTALL_HINT}"
        )


def pip_cert_bundle(directory: Path) -> Path:
    """The CA bundle pip needs here ($PIP_CERT, else the system's, else certifi's), with the
    canary certificate appended."""
    import certifi

    candidates = [os.environ.get("PIP_CERT"), "/etc/ssl/certs/ca-certificates.crt", certifi.where()]
    source = next(Path(c) for c in candidates if c and Path(c).is_file())
    bundle = directory / "pip-cert-bundle.pem"
    bundle.write_text(source.read_text().rstrip("\n") + "\n" + CANARY.read_text())
    return bundle


def canary_lines() -> list[str]:
    """The canary certificate's base64 lines (what would show if the bundle leaked)."""
    return [line for line in CANARY.read_text().splitlines() if line and "-----" not in line]


@dataclass(frozen=True)
class Built:
    name: str  # repository:tag
    seconds: float  # wall time of `make image` in this session (cold or warm)
    size_bytes: int
    log: str


def image_name() -> tuple[str, str]:
    """(repository, tag) of this checkout's test image: stable across runs of one checkout
    (so the layer cache applies), distinct between checkouts (no race on one tag)."""
    return "skinlesion", "test-" + hashlib.sha256(str(ROOT).encode()).hexdigest()[:10]


def build(workdir: Path) -> Built:
    """`make image` (the base image first when missing) with the canary CA bundle."""
    require_engine()
    repository, tag = image_name()
    name = f"{repository}:{tag}"
    previous = docker("image", "inspect", "--format", "{{.Id}}", name, check=False).stdout.strip()
    bundle = pip_cert_bundle(workdir)
    start = time.monotonic()
    done = subprocess.run(
        ["make", "image", f"IMAGE={repository}", f"TAG={tag}", f"PIP_CERT={bundle}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    seconds = time.monotonic() - start
    log = done.stdout + done.stderr
    if done.returncode != 0:
        hint = f"\n({INSTALL_HINT})" if "debootstrap" in log or "docker-engine" in log else ""
        raise DockerUnavailable(f"make image failed (exit {done.returncode}):\n{log[-6000:]}{hint}")
    current = docker("image", "inspect", "--format", "{{.Id}}", name).stdout.strip()
    if previous and previous != current:  # the last build of this tag, now untagged: its
        docker("rmi", previous, check=False)  # layers would pile up run after run
    size = int(docker("image", "inspect", "--format", "{{.Size}}", name).stdout.strip())
    return Built(name, seconds, size, log)
