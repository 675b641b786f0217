"""The one stage list, and the loop that runs it on any executor.

Ordering, input fingerprints, skip-if-done, retries, preemption handling, attempt
numbers and the run lock (one writer per run) live here; the local executor
(processes on this machine) and the Kubernetes controller (one Job per stage) only
know how to run one stage command, report how it ended and which attempts of it they
know of.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from skinlesion import cancel, config, faults, logs, runlock
from skinlesion.config import stage_settings
from skinlesion.errors import EXIT_BAD_INPUT, EXIT_DAMAGED_RUN, EXIT_STAGE_FAILED, StageFailed
from skinlesion.fields import to_flags
from skinlesion.layout import RunLayout
from skinlesion.manifest import drop_state, fingerprint, input_fingerprints, is_done
from skinlesion.obs import mlflow_log, run_end
from skinlesion.obs.pushgateway import ATTEMPT_ENV
from skinlesion.stages import INPUTS, STAGES, Stage
from skinlesion.storage import check_inside, open_store

MAX_PREEMPTIONS = 20  # node losses are not failures, but a run must still end


@dataclass(frozen=True)
class StageCall:
    """One stage of one run, fully resolved: what to run and what it depends on."""

    stage: Stage
    argv: tuple[str, ...]  # subcommand and flags, without the program name
    out_uri: str
    settings: Mapping[str, Any]
    inputs: Mapping[str, str]  # input name -> URI ("raw" is a HAM10000 tree)


# --- fingerprints (settings: config.stage_settings, inputs: manifest.input_fingerprints) --


def expected_fingerprint(call: StageCall) -> str:
    return fingerprint(call.stage.name, call.settings, input_fingerprints(call.inputs))


# --- the plan -----------------------------------------------------------------------------


def plan(
    cfg: config.PipelineConfig, layout: RunLayout, raw_uri: str | None = None
) -> list[StageCall]:
    """The stage calls of a run, in order, honouring `augment.enabled` and fine-tune epochs.

    Each stage's command is derived from the stage table: its fixed flags, one flag per
    input (resolved below), `--out`, then its config section as flags."""
    uri = layout.stage_uri
    enabled = {
        "augment": cfg.augment.enabled,
        "finetune": cfg.train.finetune_epochs > 0,
    }
    model = uri("finetune") if enabled["finetune"] else uri("train")
    source = {
        "raw": raw_uri or layout.default_raw,
        "prepared": uri("prepare"),
        "train_data": uri("augment") if enabled["augment"] else uri("prepare"),
        "val_data": uri("prepare"),
        "init_model": uri("train"),
        "model": model,
        "candidate": uri("evaluate"),
    }
    extra = {
        "prepare": ("--champion", layout.champion_uri),  # the data report's comparison
        "promote": ("--target", layout.champion_uri),
    }
    calls: list[StageCall] = []
    for stage in STAGES:
        if not enabled.get(stage.name, True):
            continue
        section = getattr(cfg, stage.section)
        inputs = {name: source[name] for name in stage.inputs}
        flags = [arg for name in stage.inputs for arg in (INPUTS[name].flag, inputs[name])]
        calls.append(
            StageCall(
                stage=stage,
                argv=(
                    stage.job,
                    *stage.args,
                    *flags,
                    *extra.get(stage.name, ()),
                    "--out",
                    uri(stage.name),
                    *to_flags(section),
                ),
                out_uri=uri(stage.name),
                settings=stage_settings(stage.name, section),
                inputs=inputs,
            )
        )
    return calls


# --- executors ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    status: Literal["succeeded", "failed", "preempted"]
    exit_code: int | None = None
    log_tail: str = ""
    detail: str = ""


class Executor(Protocol):
    def attempts_used(self, call: StageCall, run_id: str) -> int:
        """The highest attempt number of this stage the executor knows of (0: none).

        Asked before the stage's first attempt in this process; the run loop also
        counts the logs of earlier attempts and numbers the next attempt after both.
        """
        ...

    def run(self, call: StageCall, run_id: str, attempt: int) -> Outcome:
        """Run one stage command to completion and say how it ended."""
        ...


class LocalExecutor:
    """Runs each stage as a child process of this machine, streaming its output."""

    def __init__(self, tail_lines: int = 60) -> None:
        self.tail_lines = tail_lines

    def command(self, call: StageCall, run_id: str) -> list[str]:
        return [sys.executable, "-m", "skinlesion", *call.argv, "--run-id", run_id]

    def attempts_used(self, call: StageCall, run_id: str) -> int:
        return 0  # a child process leaves nothing behind but the log the loop saved

    def run(self, call: StageCall, run_id: str, attempt: int) -> Outcome:
        env = {**os.environ, ATTEMPT_ENV: str(attempt)}  # for the stage's metrics push
        proc = subprocess.Popen(self.command(call, run_id), stderr=subprocess.PIPE, env=env)
        assert proc.stderr is not None
        tail: collections.deque[bytes] = collections.deque(maxlen=self.tail_lines)
        partial = b""
        try:
            while chunk := os.read(proc.stderr.fileno(), 65536):
                sys.stderr.buffer.write(chunk)
                sys.stderr.buffer.flush()
                *lines, partial = (partial + chunk).split(b"\n")
                tail.extend(lines)
            code = proc.wait()
        except BaseException:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            raise
        if partial:
            tail.append(partial)
        text = b"\n".join(tail).decode(errors="replace")
        if code == 0:
            return Outcome("succeeded", 0, text)
        return Outcome("failed", code, text, f"exit code {code}")


# --- the loop -----------------------------------------------------------------------------


@dataclass
class StageReport:
    stage: str
    status: Literal["skipped", "done"]
    attempts: int = 0  # made by this process
    seconds: float = 0.0
    out_uri: str = ""


@dataclass
class RunReport:
    run_id: str
    stages: list[StageReport] = field(default_factory=list)


def _save_log(layout: RunLayout, stage: str, attempt: int, outcome: Outcome) -> str:
    logs_store = open_store(layout.logs_uri)
    key = layout.log_key(stage, attempt)
    logs_store.put_bytes(key, outcome.log_tail.encode())
    return f"{logs_store.uri}/{key}"


def _attempts_logged(layout: RunLayout, stage: str) -> int:
    """The highest attempt number of the stage with a saved log (0: none)."""
    attempts = (layout.logged_attempt(stage, o.key) for o in open_store(layout.logs_uri).list())
    return max((n for n in attempts if n is not None), default=0)


def run_pipeline(
    cfg: config.PipelineConfig,
    layout: RunLayout,
    executor: Executor,
    raw_uri: str | None = None,
    retry_delay_s: float = 1.0,
    lock_ttl_s: float = runlock.DEFAULT_TTL_S,
) -> RunReport:
    """Run every stage not already done, in order; raise StageFailed naming the stage.

    The run's lock (runlock.py) is held throughout: a second run of the same id on
    the same store is refused (RunLocked) instead of writing the same prefixes.
    """
    for uri in (layout.run_uri, layout.champion_uri):
        check_inside(layout.store, uri)
    with runlock.hold(open_store(layout.run_uri), layout.run_id, lock_ttl_s) as lock:
        start, report, error = time.monotonic(), RunReport(layout.run_id), None
        mlflow_log.start_run(layout.run_id, config.to_dict(cfg))  # off unless configured
        try:
            return _run_stages(cfg, layout, executor, raw_uri, retry_delay_s, lock, report)
        except BaseException as exc:
            error = exc
            raise
        finally:  # Pushgateway run state, run-end webhook, MLflow status (each off unless set)
            done = sum(s.status == "done" for s in report.stages)
            run_end.report(layout, error, time.monotonic() - start, done)


def _run_stages(
    cfg: config.PipelineConfig,
    layout: RunLayout,
    executor: Executor,
    raw_uri: str | None,
    retry_delay_s: float,
    lock: runlock.RunLock,
    report: RunReport,
) -> RunReport:
    log = logs.get()
    cancel.clear(layout)  # this run resumes whatever an earlier, cancelled one left
    for call in plan(cfg, layout, raw_uri):
        lock.check()
        name = call.stage.name
        out = open_store(call.out_uri)
        expected = expected_fingerprint(call)
        if is_done(out, expected):
            log.info("stage_skipped", step=name, reason="done with the same inputs and settings")
            drop_state(out)  # resume state of an attempt killed right after its commit
            report.stages.append(StageReport(name, "skipped", out_uri=call.out_uri))
            continue
        # Attempt numbers go on from earlier processes' (their Jobs and logs are kept);
        # the retry budget counts this process's attempts only.
        attempt = max(_attempts_logged(layout, name), executor.attempts_used(call, layout.run_id))
        failures = preemptions = tries = 0
        start = time.monotonic()
        while True:
            attempt += 1
            tries += 1
            cancel.check(layout)
            log.info("stage_start", step=name, attempt=attempt, pool=call.stage.pool)
            outcome = executor.run(call, layout.run_id, attempt)
            lock.check()
            if outcome.status == "succeeded":
                if not is_done(out, expected):
                    raise StageFailed(name, "exited 0 but committed no manifest for these inputs")
                break
            saved = _save_log(layout, name, attempt, outcome)
            cancel.check(layout)  # e.g. its Job was deleted by the cancel: stop, do not retry
            if outcome.status == "preempted":
                preemptions += 1
                log.warning("stage_preempted", step=name, attempt=attempt, detail=outcome.detail)
                if preemptions > MAX_PREEMPTIONS:
                    raise StageFailed(
                        name, f"preempted {preemptions} times; log: {saved}", EXIT_STAGE_FAILED
                    )
                continue
            if outcome.exit_code == EXIT_BAD_INPUT:
                raise StageFailed(name, f"bad input (not retried); log: {saved}", EXIT_BAD_INPUT)
            if outcome.exit_code == EXIT_DAMAGED_RUN:
                raise StageFailed(
                    name,
                    "the run's stored outputs are inconsistent (not retried: rerun the same "
                    f"run id to recompute the stale stages); log: {saved}",
                    EXIT_DAMAGED_RUN,
                )
            failures += 1
            log.warning(
                "stage_failed",
                step=name,
                attempt=attempt,
                detail=outcome.detail,
                log_uri=saved,
                retries_left=cfg.retries - failures + 1,
            )
            if failures > cfg.retries:
                detail = f"{outcome.detail} after {tries} attempts; log: {saved}"
                raise StageFailed(name, detail, EXIT_STAGE_FAILED)
            time.sleep(retry_delay_s * 2 ** (failures - 1))
        seconds = time.monotonic() - start
        log.info("stage_done", step=name, attempts=tries, seconds=round(seconds, 1))
        report.stages.append(StageReport(name, "done", tries, seconds, call.out_uri))
        faults.point("stage_done")
    return report
