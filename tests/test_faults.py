"""The fault points (skinlesion/faults.py): unarmed they do nothing; armed, the n-th pass of
the named point in the named stage's process SIGKILLs its process group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from skinlesion import cli, faults
from skinlesion.errors import EXIT_BAD_INPUT, InputError


@pytest.fixture(autouse=True)
def disarmed() -> Iterator[None]:
    yield
    faults.arm(None, "")


@pytest.mark.parametrize(
    "spec", ["train", "train:batch", "train:nowhere:1", "train:batch:0", "train:batch:x", "a:b:c:1"]
)
def test_a_malformed_spec_is_refused_naming_the_variable(spec: str) -> None:
    with pytest.raises(InputError, match=f"{faults.ENV}=.*<stage>:<point>:<n>"):
        faults.arm(spec, "train")


def test_unarmed_or_another_stages_point_does_nothing() -> None:
    for _ in range(3):
        faults.point("batch")  # unarmed
    faults.arm("finetune:batch:1", "train")  # another stage's process
    faults.point("batch")
    assert faults.keras_callbacks() == []  # no per-batch Keras hook unless it is armed
    faults.arm("train:batch:5", "train")
    assert len(faults.keras_callbacks()) == 1


def test_the_nth_pass_kills_the_process_group() -> None:
    code = (
        "import sys; from skinlesion import faults\n"
        "faults.arm('prepare:image:3', 'prepare')\n"
        "for i in range(1, 6):\n"
        "    faults.point('upload'); faults.point('image'); print(i, flush=True)\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        start_new_session=True,  # the kill takes its group: never this test's
    )
    assert child.returncode == -signal.SIGKILL
    assert child.stdout.split() == ["1", "2"]


def test_the_cli_refuses_a_malformed_spec_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(faults.ENV, "prepare:image")
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert cli.main(["runs", "list", "--store", os.devnull + "-none"]) == EXIT_BAD_INPUT
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"skinlesion runs: error: {faults.ENV}=")
