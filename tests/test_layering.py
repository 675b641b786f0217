"""The import contracts in pyproject.toml ([tool.importlinter], run by `make lint`): they
hold for the package as it is, and each one fails when a module breaks it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", str(root / "pyproject.toml")],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the package and its pyproject.toml, to break."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    shutil.copytree(
        ROOT / "skinlesion", tmp_path / "skinlesion", ignore=shutil.ignore_patterns("__pycache__")
    )
    return tmp_path


def test_the_package_keeps_every_contract(tree: Path) -> None:
    result = lint_imports(tree)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("skinlesion/sneaky.py", "import boto3", "imported only by skinlesion.storage"),
        ("skinlesion/sneaky.py", "from botocore import config", "only by skinlesion.storage"),
        ("skinlesion/sneaky.py", "from kubernetes import client", "only by skinlesion.kube"),
        ("skinlesion/predict.py", "from skinlesion import cli", "never import the CLI"),
        ("skinlesion/train.py", "import skinlesion.controller", "never import the CLI"),
        ("skinlesion/prepare.py", "from skinlesion import kube_executor", "never import the CLI"),
        ("skinlesion/predict.py", "from skinlesion import pipeline", "the orchestrator"),
        ("skinlesion/trainer.py", "from skinlesion import pipeline", "the orchestrator"),
    ],
)
def test_a_forbidden_import_fails_its_contract(
    tree: Path, module: str, line: str, contract: str
) -> None:
    path = tree / module
    text = path.read_text() if path.exists() else '"""A module that breaks a contract."""\n'
    path.write_text(text + f"\n{line}  # noqa\n")
    result = lint_imports(tree)
    assert result.returncode != 0, result.stdout
    broken = [ln for ln in result.stdout.splitlines() if " BROKEN" in ln]
    assert any(contract in ln for ln in broken), result.stdout
