"""`skinlesion runs list|show`: each run's stage states, attempts, durations, metrics and
promotion, read from the store alone (file store and real S3)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from skinlesion import cli, config, runlock
from skinlesion.errors import EXIT_BAD_INPUT, StageFailed
from skinlesion.layout import RunLayout
from skinlesion.manifest import commit_stage, input_fingerprints
from skinlesion.pipeline import Outcome, StageCall, run_pipeline
from skinlesion.results import Preprocessing, PromoteResult
from skinlesion.run_status import run_status
from skinlesion.storage import Store, open_store
from skinlesion.synthetic import write_sample_data
from tests.stage_results import evaluate_result
from tests.test_pipeline import ScriptedExecutor

BACKENDS = ["file", pytest.param("s3", marks=pytest.mark.s3)]
METRICS = {"balanced_accuracy": 0.75, "accuracy": 0.8}


class TypedExecutor(ScriptedExecutor):
    """Commits evaluate and promote with real typed results, like the stages do."""

    def run(self, call: StageCall, run_id: str, attempt: int) -> Outcome:
        name = call.stage.name
        steps = self.script.get(name, [])
        if name not in ("evaluate", "promote") or (steps and steps[0] != "ok"):
            return super().run(call, run_id, attempt)
        self.calls.append((name, attempt))

        def body(work: Path) -> Any:
            if name == "evaluate":
                return evaluate_result("sha", Preprocessing(64, "squash", 95), METRICS)
            return PromoteResult({"promoted": True, "reason": "no champion yet"})

        out = open_store(call.out_uri)
        commit_stage(name, out, call.settings, input_fingerprints(call.inputs), body)
        return Outcome("succeeded", 0)


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest) -> Store:
    name = "file_store" if request.param == "file" else "s3_store"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = tmp_path_factory.mktemp("raw").as_uri()
    write_sample_data(open_store(uri), images=70, seed=1, workers=1)
    return uri


def _run(store: Store, raw: str, run_id: str, ex: Any, **overrides: Any) -> Any:
    cfg = config.load_pipeline("tiny", overrides=[f"{k}={v}" for k, v in overrides.items()])
    return run_pipeline(cfg, RunLayout(store.uri, run_id), ex, raw_uri=raw, retry_delay_s=0)


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().out


def test_runs_list_and_show_every_state(
    store: Store, raw: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _run(store, raw, "done-run", TypedExecutor({"train": ["1"]}), retries=1)
    with pytest.raises(StageFailed):
        _run(store, raw, "failed-run", TypedExecutor({"augment": ["1", "1"]}), retries=1)
    _run(store, raw, "noaug-run", TypedExecutor(), **{"augment.enabled": "false"})
    with pytest.raises(StageFailed):
        _run(store, raw, "cancel-run", TypedExecutor({"augment": ["1"]}), retries=0)
    assert cli.main(["cancel", "--store", store.uri, "--run-id", "cancel-run"]) == 0
    capsys.readouterr()

    code, out = _cli(capsys, "runs", "list", "--store", store.uri, "--json")
    assert code == 0
    runs = {r["run_id"]: r for r in json.loads(out)}
    assert set(runs) == {"cancel-run", "done-run", "failed-run", "noaug-run"}
    done = runs["done-run"]
    assert done["state"] == "done" and done["metrics"] == METRICS
    assert done["promotion"] == {"promoted": True, "reason": "no champion yet"}
    by_stage = {s["stage"]: s for s in done["stages"]}
    assert [s["state"] for s in done["stages"]] == ["done"] * 6
    assert by_stage["train"]["attempts"] == 2 and by_stage["prepare"]["attempts"] == 1
    assert all(s["seconds"] is not None and s["seconds"] >= 0 for s in done["stages"])
    failed = {s["stage"]: s for s in runs["failed-run"]["stages"]}
    assert runs["failed-run"]["state"] == "failed"
    assert failed["augment"] == {**failed["augment"], "state": "failed", "attempts": 2}
    assert failed["train"]["state"] == "pending" and runs["failed-run"]["promotion"] is None
    assert [s["stage"] for s in runs["noaug-run"]["stages"]] == [
        "prepare", "train", "finetune", "evaluate", "promote",
    ]  # fmt: skip
    assert runs["cancel-run"]["state"] == "cancelled"
    assert runs["cancel-run"]["cancelled"]["run_id"] == "cancel-run"

    code, out = _cli(capsys, "runs", "list", "--store", store.uri)
    assert code == 0 and "done-run" in out and "0.750" in out
    code, out = _cli(capsys, "runs", "show", "failed-run", "--store", store.uri)
    assert code == 0 and out.startswith("run failed-run: failed")
    assert "augment   failed     2" in out
    assert cli.main(["runs", "show", "nope", "--store", store.uri]) == EXIT_BAD_INPUT
    assert cli.main(["runs", "list", "--store", "ftp://host/x"]) == EXIT_BAD_INPUT
    assert cli.main(["runs", "list", "--store", store.uri, "--frobnicate"]) == EXIT_BAD_INPUT


def test_a_run_holding_its_lock_is_running(store: Store, raw: str) -> None:
    with pytest.raises(StageFailed):
        _run(store, raw, "r1", TypedExecutor({"train": ["1"]}), retries=0)
    layout = RunLayout(store.uri, "r1")
    with runlock.hold(open_store(layout.run_uri), "r1"):
        status = run_status(store.uri, "r1")
    assert status.state == "running" and status.holder
    states = {s.stage: (s.state, s.attempts) for s in status.stages}
    assert states["augment"] == ("done", 1) and states["train"] == ("running", 2)
    assert run_status(store.uri, "r1").state == "failed"  # once the lock is released
