"""The lock file, `constraints.txt`: the exact versions `make run`, `make test` and the
image install (`pip install -c constraints.txt`).

Four sections, each the closure of one requirement list for linux x86_64, Python 3.11:
the runtime (pyproject's [project] dependencies: the CPU image), the optional extras
(every extra but `dev`, e.g. `mlflow`: the image installs them; less the runtime pins), the
development tools (the `dev` extra, less the runtime and extras pins: `make test` only) and
the GPU image's extra CUDA wheels (`tensorflow[and-cuda]` resolved against the runtime
pins). `make lock` regenerates
it from the current .venv (run after changing pyproject.toml); tests/test_chart.py fails
when the .venv drifts from it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
SECTIONS = ("runtime", "extras", "dev", "gpu")
_HEADINGS = {
    "runtime": "# Runtime: pyproject [project] dependencies (the CPU image, make run).",
    "extras": "# Optional extras: every pyproject extra but dev (the image installs them).",
    "dev": "# Development tools only: the `dev` extra (make test), less the runtime pins.",
    "gpu": "# GPU target only: tensorflow[and-cuda] (CUDA / cuDNN wheels), resolved with\n"
    "# pip install --dry-run --report -c <the runtime pins> 'tensorflow[and-cuda]==<pin>'.",
}
_LINUX_PY311 = {
    "python_version": "3.11",
    "python_full_version": "3.11.9",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "extra": "",
}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def closure(requirements: list[str]) -> dict[str, str]:
    """Installed version of every package in the closure of `requirements` (no extras of
    dependencies), from this environment."""
    pins: dict[str, str] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in pins:
            continue
        dist = metadata.distribution(req.name)
        pins[name] = dist.version
        for text in dist.requires or []:
            sub = Requirement(text)
            if sub.marker is None or sub.marker.evaluate(_LINUX_PY311):
                todo.append(sub)
    return dict(sorted(pins.items()))


def runtime_pins() -> dict[str, str]:
    return closure(_pyproject()["dependencies"])


def extras_pins() -> dict[str, str]:
    runtime = runtime_pins()
    extras = _pyproject()["optional-dependencies"]
    wanted = [r for name, reqs in extras.items() if name != "dev" for r in reqs]
    return {n: v for n, v in closure(wanted).items() if n not in runtime}


def dev_pins() -> dict[str, str]:
    taken = runtime_pins() | extras_pins()
    dev = closure(_pyproject()["optional-dependencies"]["dev"])
    return {n: v for n, v in dev.items() if n not in taken}


def read() -> dict[str, dict[str, str]]:
    """constraints.txt as {section: {name: version}}."""
    pins: dict[str, dict[str, str]] = {s: {} for s in SECTIONS}
    section = "runtime"
    for line in CONSTRAINTS.read_text().splitlines():
        for name, heading in _HEADINGS.items():
            if line == heading.splitlines()[0]:
                section = name
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[section][name] = version
    return pins


def _gpu_pins(cpu: dict[str, str]) -> dict[str, str]:
    """Resolve tensorflow[and-cuda] against the CPU pins with pip (needs the package index)."""
    with tempfile.TemporaryDirectory() as tmp:
        pinned = Path(tmp) / "c.txt"
        pinned.write_text("".join(f"{n}=={v}\n" for n, v in cpu.items()))
        report = Path(tmp) / "report.json"
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
             "--only-binary", ":all:", "--report", str(report), "-c", str(pinned),
             f"tensorflow[and-cuda]=={cpu['tensorflow']}"],
            check=True,
        )  # fmt: skip
        resolved = json.loads(report.read_text())["install"]
    versions = {
        canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in resolved
    }
    return {n: v for n, v in versions.items() if n not in cpu}


def write() -> None:
    """Regenerate constraints.txt from this environment (`make lock`)."""
    sections = {"runtime": runtime_pins(), "extras": extras_pins(), "dev": dev_pins()}
    sections["gpu"] = _gpu_pins(sections["runtime"])
    lines = [
        "# The lock file: exact versions for make run, make test and the image",
        "# (pip install -c constraints.txt). Generated by `make lock` (tests/lockfile.py) from",
        "# the tested .venv; tests/test_chart.py fails when the .venv drifts from these pins.",
    ]
    for name in SECTIONS:
        lines += ["", _HEADINGS[name], *(f"{n}=={v}" for n, v in sorted(sections[name].items()))]
    CONSTRAINTS.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    write()
