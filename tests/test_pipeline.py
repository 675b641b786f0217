"""The shared stage list and run loop (executor-independent behaviour)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from skinlesion import cli, config
from skinlesion.config import stage_settings
from skinlesion.errors import (
    EXIT_BAD_INPUT,
    EXIT_STAGE_FAILED,
    InputError,
    RunCancelled,
    StageFailed,
)
from skinlesion.layout import RunLayout
from skinlesion.manifest import STATE_PREFIX, commit_stage, input_fingerprints, read_manifest
from skinlesion.pipeline import Outcome, StageCall, plan, run_pipeline
from skinlesion.stages import STAGES
from skinlesion.storage import open_store, put_json
from skinlesion.synthetic import write_sample_data

SECTION = {
    "prepare": config.PrepareConfig,
    "augment": config.AugmentConfig,
    "train": config.TrainConfig,
    "finetune": config.TrainConfig,
    "evaluate": config.EvaluateConfig,
    "promote": config.PromoteConfig,
}


def _layout(tmp_path: Path, run_id: str = "r1") -> RunLayout:
    return RunLayout(f"file://{tmp_path}/store", run_id)


@pytest.mark.parametrize("preset", sorted(config.PRESETS))
def test_plan_argv_parses_back_to_the_same_settings(tmp_path: Path, preset: str) -> None:
    """The fingerprint a stage commits must equal the one the pipeline expects."""
    cfg = config.load_pipeline(preset)
    calls = plan(cfg, _layout(tmp_path))
    assert [c.stage.name for c in calls] == [s.name for s in STAGES]
    parser = cli.build_parser()
    for call in calls:
        args = parser.parse_args([*call.argv, "--run-id", "r1"])
        assert args.command == call.stage.job
        section = config.section_from_args(SECTION[call.stage.name], args, call.stage.name)
        assert stage_settings(call.stage.name, section) == call.settings
        assert args.out == call.out_uri


def test_plan_skips_augment_and_finetune_when_disabled(tmp_path: Path) -> None:
    cfg = config.load_pipeline(
        "tiny", overrides=["augment.enabled=false", "train.finetune_epochs=0"]
    )
    calls = {c.stage.name: c for c in plan(cfg, _layout(tmp_path))}
    assert list(calls) == ["prepare", "train", "evaluate", "promote"]
    assert calls["train"].inputs["train_data"].endswith("/runs/r1/prepare")
    assert calls["evaluate"].inputs["model"].endswith("/runs/r1/train")


def test_settings_ignore_fields_that_do_not_change_output() -> None:
    base = stage_settings("prepare", config.PrepareConfig())
    assert base == stage_settings("prepare", config.PrepareConfig(workers=7))
    top = stage_settings("train", config.TrainConfig())
    assert top == stage_settings("train", config.TrainConfig(finetune_learning_rate=0.5))
    assert top != stage_settings("train", config.TrainConfig(top_learning_rate=0.5))


def test_run_layout_refuses_unsafe_run_ids(tmp_path: Path) -> None:
    for bad in ("../x", "Run", "a/b", "", "x" * 41, "-a"):
        with pytest.raises(InputError):
            RunLayout(f"file://{tmp_path}", bad)


class ScriptedExecutor:
    """Stands in for a cluster: each attempt follows a script, success commits the stage."""

    def __init__(self, script: dict[str, list[str]] | None = None) -> None:
        self.script = script or {}
        self.calls: list[tuple[str, int]] = []
        self.outputs = 0  # each commit writes new bytes: out.bin

    def _body(self, work: Path) -> dict[str, Any]:
        self.outputs += 1
        (work / "out.bin").write_bytes(f"output {self.outputs}".encode())
        return {}

    def attempts_used(self, call: StageCall, run_id: str) -> int:
        return 0  # like a local process: nothing but the logs the loop saved

    def run(self, call: StageCall, run_id: str, attempt: int) -> Outcome:
        self.calls.append((call.stage.name, attempt))
        steps = self.script.get(call.stage.name, [])
        action = steps.pop(0) if steps else "ok"
        if action == "ok":
            out = open_store(call.out_uri)
            inputs = input_fingerprints(call.inputs)
            commit_stage(call.stage.name, out, call.settings, inputs, self._body)
            return Outcome("succeeded", 0)
        if action == "no-commit":
            return Outcome("succeeded", 0)
        if action == "preempt":
            return Outcome("preempted", None, "node went away", "DisruptionTarget")
        code = int(action)
        return Outcome(
            "failed", code, f"log of {call.stage.name} attempt {attempt}", f"exit {code}"
        )


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = f"file://{tmp_path_factory.mktemp('raw')}"
    write_sample_data(open_store(uri), images=70, seed=1)
    return uri


def _run(tmp_path: Path, raw: str, ex: Any, **overrides: Any) -> Any:
    cfg = config.load_pipeline("tiny", overrides=[f"{k}={v}" for k, v in overrides.items()])
    return run_pipeline(cfg, _layout(tmp_path), ex, raw_uri=raw, retry_delay_s=0)


def test_full_run_in_order_then_rerun_skips_everything(tmp_path: Path, raw: str) -> None:
    ex = ScriptedExecutor()
    report = _run(tmp_path, raw, ex)
    assert [name for name, _ in ex.calls] == [s.name for s in STAGES]
    assert all(s.status == "done" for s in report.stages)
    again = ScriptedExecutor()
    report = _run(tmp_path, raw, again)
    assert again.calls == []
    assert all(s.status == "skipped" for s in report.stages)


def test_a_skipped_stage_drops_the_resume_state_a_killed_attempt_left(
    tmp_path: Path, raw: str
) -> None:
    """Killed between its commit and its clean-up, training leaves `state/` next to its
    committed outputs; the rerun that skips the stage removes it."""
    _run(tmp_path, raw, ScriptedExecutor())
    train = open_store(_layout(tmp_path).stage_uri("train"))
    train.put_bytes(f"{STATE_PREFIX}/state.json", b"{}")
    train.put_bytes(f"{STATE_PREFIX}/epoch-0002.keras", b"model")
    again = ScriptedExecutor()
    _run(tmp_path, raw, again)
    assert again.calls == []
    assert train.list(STATE_PREFIX) == [] and read_manifest(train) is not None


def test_changed_setting_reruns_that_stage_and_downstream_only(tmp_path: Path, raw: str) -> None:
    _run(tmp_path, raw, ScriptedExecutor())
    ex = ScriptedExecutor()
    _run(tmp_path, raw, ex, **{"evaluate.batch_size": 7})
    assert [name for name, _ in ex.calls] == ["evaluate", "promote"]


def test_changed_upstream_bytes_under_the_same_fingerprint_rerun_downstream(
    tmp_path: Path, raw: str
) -> None:
    """A second writer of the same work (same fingerprint, other bytes) is not a cache hit:
    downstream fingerprints include the upstream files' sha256s."""
    _run(tmp_path, raw, ScriptedExecutor())
    train = open_store(_layout(tmp_path).stage_uri("train"))
    manifest = read_manifest(train)
    assert manifest is not None
    manifest["files"]["out.bin"] = {"sha256": train.put_bytes("out.bin", b"other"), "size": 5}
    put_json(train, "manifest.json", manifest)
    ex = ScriptedExecutor()
    _run(tmp_path, raw, ex)
    assert [name for name, _ in ex.calls] == ["finetune", "evaluate", "promote"]


def test_failures_are_retried_then_the_stage_is_named(tmp_path: Path, raw: str) -> None:
    ex = ScriptedExecutor({"augment": ["1", "1", "1"]})
    with pytest.raises(StageFailed, match="stage 'augment' failed") as info:
        _run(tmp_path, raw, ex, retries=2)
    assert ex.calls[-3:] == [("augment", 1), ("augment", 2), ("augment", 3)]
    # not 1: a controller pod restarted by its Job would spend a new budget on it
    assert info.value.exit_code == EXIT_STAGE_FAILED
    logs = open_store(_layout(tmp_path).logs_uri)
    assert logs.get_bytes("augment-attempt-3.log").decode() == "log of augment attempt 3"


def test_a_rerun_numbers_its_attempts_after_the_saved_logs(tmp_path: Path, raw: str) -> None:
    with pytest.raises(StageFailed, match="after 1 attempts"):
        _run(tmp_path, raw, ScriptedExecutor({"augment": ["1"]}), retries=0)
    ex = ScriptedExecutor({"augment": ["1"]})
    with pytest.raises(StageFailed, match="after 1 attempts"):  # a budget per process
        _run(tmp_path, raw, ex, retries=0)
    assert ex.calls == [("augment", 2)]
    logs = open_store(_layout(tmp_path).logs_uri)
    for attempt in (1, 2):
        text = logs.get_bytes(f"augment-attempt-{attempt}.log").decode()
        assert text == f"log of augment attempt {attempt}"


class CancellingExecutor(ScriptedExecutor):
    """`skinlesion cancel` arrives while the given stage runs (which then fails)."""

    def __init__(self, layout: RunLayout, stage: str) -> None:
        super().__init__({stage: ["1"]})
        self.layout, self.stage = layout, stage

    def run(self, call: StageCall, run_id: str, attempt: int) -> Outcome:
        if call.stage.name == self.stage and not self.calls:
            assert cli.main(["cancel", "--store", self.layout.store_uri, "--run-id", run_id]) == 0
        return super().run(call, run_id, attempt)


def test_a_cancelled_run_stops_without_retry_and_a_rerun_resumes(tmp_path: Path, raw: str) -> None:
    layout = _layout(tmp_path)
    ex = CancellingExecutor(layout, "prepare")
    with pytest.raises(RunCancelled, match=r"was cancelled at .* rerun the same run id"):
        _run(tmp_path, raw, ex, retries=3)
    assert ex.calls == [("prepare", 1)]  # its failure is not retried once cancelled
    assert open_store(layout.run_uri).exists("cancelled.json")
    again = ScriptedExecutor()
    report = _run(tmp_path, raw, again, retries=0)
    assert again.calls[0] == ("prepare", 2) and report.stages[-1].stage == "promote"
    assert not open_store(layout.run_uri).exists("cancelled.json")
    assert cli.main(["cancel", "--store", "bad://x", "--run-id", "r1"]) == EXIT_BAD_INPUT


def test_a_retry_that_succeeds_continues_the_run(tmp_path: Path, raw: str) -> None:
    ex = ScriptedExecutor({"train": ["1"]})
    report = _run(tmp_path, raw, ex, retries=1)
    assert ("train", 2) in ex.calls
    assert report.stages[-1].stage == "promote"


def test_bad_input_fails_fast_without_retry(tmp_path: Path, raw: str) -> None:
    ex = ScriptedExecutor({"prepare": [str(EXIT_BAD_INPUT)]})
    with pytest.raises(StageFailed) as info:
        _run(tmp_path, raw, ex, retries=3)
    assert ex.calls == [("prepare", 1)]
    assert info.value.exit_code == EXIT_BAD_INPUT


def test_preemption_is_retried_without_counting(tmp_path: Path, raw: str) -> None:
    ex = ScriptedExecutor({"train": ["preempt", "preempt", "preempt"]})
    _run(tmp_path, raw, ex, retries=0)
    assert [a for name, a in ex.calls if name == "train"] == [1, 2, 3, 4]


def test_exit_zero_without_manifest_is_a_failure(tmp_path: Path, raw: str) -> None:
    with pytest.raises(StageFailed, match="committed no manifest"):
        _run(tmp_path, raw, ScriptedExecutor({"prepare": ["no-commit"]}))
    assert read_manifest(open_store(_layout(tmp_path).stage_uri("prepare"))) is None
