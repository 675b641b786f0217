"""The store layout: the prefixes of a run and the stage-sibling URI."""

from __future__ import annotations

import pytest

from skinlesion.errors import InputError
from skinlesion.layout import RunLayout, sibling_stage_uri


def test_run_layout_prefixes() -> None:
    layout = RunLayout("s3://b/p/", "r1")
    assert layout.default_raw == "s3://b/p/raw/HAM10000"
    assert layout.stage_uri("train") == "s3://b/p/runs/r1/train"
    assert layout.logs_uri == "s3://b/p/runs/r1/logs"
    assert layout.log_key("train", 2) == "train-attempt-2.log"
    assert layout.champion_uri == "s3://b/p/models/latest"


def test_logged_attempt_reads_back_log_key() -> None:
    assert RunLayout.logged_attempt("train", RunLayout.log_key("train", 12)) == 12
    for other in ("finetune-attempt-1.log", "train-attempt-x.log", "train-attempt-1.txt", "t"):
        assert RunLayout.logged_attempt("train", other) is None


def test_sibling_stage_uri() -> None:
    assert sibling_stage_uri("s3://b/p/runs/r1/evaluate", "promote") == "s3://b/p/runs/r1/promote"
    assert (
        sibling_stage_uri("file:///x/runs/r1/evaluate/", "augment") == "file:///x/runs/r1/augment"
    )
    assert sibling_stage_uri("/x/runs/r1/train", "prepare") == "/x/runs/r1/prepare"
    assert sibling_stage_uri("s3://bucket", "promote") is None
    with pytest.raises(InputError):
        sibling_stage_uri("s3://b/runs/r1/evaluate", "../x")
