"""`skinlesion gc`: old runs' outputs go, the champion's lineage and running runs stay,
and a rerun of a deleted run recomputes it (file store and real S3)."""

from __future__ import annotations

import time

import pytest

from skinlesion import cli, runlock
from skinlesion.layout import RunLayout
from skinlesion.stages import STAGES
from skinlesion.storage import Store, open_store, put_json
from tests.test_run_status import BACKENDS, TypedExecutor, _run
from tests.test_run_status import raw as raw


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest) -> Store:
    name = "file_store" if request.param == "file" else "s3_store"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


def _objects(store: Store, run_id: str) -> int:
    return len(open_store(RunLayout(store.uri, run_id).run_uri).list())


def test_gc_keeps_the_newest_the_champions_and_running_runs(
    store: Store, raw: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for run_id in ("oldest", "old", "older-running", "new"):
        _run(store, raw, run_id, TypedExecutor())
        time.sleep(1.1)  # commit times have second resolution: keep the order clear
    layout = RunLayout(store.uri, "oldest")
    put_json(
        open_store(layout.champion_uri),
        "manifest.json",
        {"stage": "champion", "fingerprint": "f", "run_id": "oldest",
         "model_uri": layout.stage_uri("finetune"), "evaluation_uri": layout.stage_uri("evaluate")},
    )  # fmt: skip
    argv = ["gc", "--store", store.uri, "--keep-last", "1"]
    before = {r: _objects(store, r) for r in ("oldest", "old", "older-running", "new")}
    assert cli.main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would delete old" in out and "would delete 2 of 4 runs" in out
    assert {r: _objects(store, r) for r in before} == before  # a dry run deletes nothing
    assert cli.main([*argv, "--older-than", "1"]) == 0  # nothing is a day old
    assert "deleted 0 of 4 runs" in capsys.readouterr().out
    running = open_store(RunLayout(store.uri, "older-running").run_uri)
    with runlock.hold(running, "older-running"):
        assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "keep         new" in out and "(among the newest 1)" in out
    assert "(the champion was built from it)" in out and "(running (its lock is held))" in out
    assert "deleted      old" in out and "deleted 1 of 4 runs" in out
    assert _objects(store, "old") == 0
    assert _objects(store, "oldest") == before["oldest"] and _objects(store, "new") == before["new"]
    assert _objects(store, "older-running") > 0
    again = TypedExecutor()
    _run(store, raw, "old", again)  # no stale cache hit: every stage runs again
    assert [name for name, _ in again.calls] == [s.name for s in STAGES]


def test_gc_refuses_a_negative_count(store: Store) -> None:
    assert cli.main(["gc", "--store", store.uri, "--keep-last", "-1"]) == 2
    assert cli.main(["gc", "--store", store.uri, "--keep-last", "1", "--older-than", "-2"]) == 2
