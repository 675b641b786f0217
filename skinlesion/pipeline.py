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
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from skinlesion import config, logs, runlock
from skinlesion.config import stage_settings
from skinlesion.errors import EXIT_BAD_INPUT, EXIT_DAMAGED_RUN, StageFailed
from skinlesion.keys import safe_run_id
from skinlesion.manifest import fingerprint, input_fingerprints, is_done
from skinlesion.storage import open_store

Pool = Literal["cpu", "gpu"]
MAX_PREEMPTIONS = 20  # node losses are not failures, but a run must still end


@dataclass(frozen=True)
class Stage:
    name: str  # also the store prefix runs/<id>/<name>/
    pool: Pool
    job: str  # CLI subcommand and jobs/<job>.py entrypoint


STAGES: tuple[Stage, ...] = (
    Stage("prepare", "cpu", "prepare"),
    Stage("augment", "cpu", "augment"),
    Stage("train", "gpu", "train"),
    Stage("finetune", "gpu", "train"),
    Stage("evaluate", "cpu", "evaluate"),
    Stage("promote", "cpu", "promote"),
)
STAGE_BY_NAME = {s.name: s for s in STAGES}


@dataclass(frozen=True)
class RunLayout:
    """Where a run's inputs and outputs live in the store (README: store layout)."""

    store_uri: str
    run_id: str

    def __post_init__(self) -> None:
        safe_run_id(self.run_id)

    @property
    def store(self) -> str:
        return self.store_uri.rstrip("/")

    @property
    def default_raw(self) -> str:
        return f"{self.store}/raw/HAM10000"

    @property
    def run_uri(self) -> str:
        return f"{self.store}/runs/{self.run_id}"

    def stage_uri(self, stage: str) -> str:
        return f"{self.run_uri}/{stage}"

    @property
    def logs_uri(self) -> str:
        return f"{self.run_uri}/logs"

    @property
    def champion_uri(self) -> str:
        return f"{self.store}/models/latest"


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
    """The stage calls of a run, in order, honouring `augment.enabled` and fine-tune epochs."""
    raw = raw_uri or layout.default_raw
    uri = layout.stage_uri
    calls: list[StageCall] = []

    def add(name: str, argv: list[str], section: Any, inputs: dict[str, str]) -> None:
        calls.append(
            StageCall(
                stage=STAGE_BY_NAME[name],
                argv=(*argv, "--out", uri(name), *config.to_flags(section)),
                out_uri=uri(name),
                settings=stage_settings(name, section),
                inputs=inputs,
            )
        )

    add("prepare", ["prepare", "--raw", raw], cfg.prepare, {"raw": raw})
    train_data = uri("prepare")
    if cfg.augment.enabled:
        add(
            "augment",
            ["augment", "--prepared", uri("prepare")],
            cfg.augment,
            {"prepared": uri("prepare")},
        )
        train_data = uri("augment")
    data = {"train_data": train_data, "val_data": uri("prepare")}
    add(
        "train",
        ["train", "--phase", "top", "--train-data", train_data, "--val-data", uri("prepare")],
        cfg.train,
        data,
    )
    model = uri("train")
    if cfg.train.finetune_epochs > 0:
        add(
            "finetune",
            [
                "train",
                "--phase",
                "finetune",
                "--train-data",
                train_data,
                "--val-data",
                uri("prepare"),
                "--init-model",
                uri("train"),
            ],
            cfg.train,
            {**data, "init_model": uri("train")},
        )
        model = uri("finetune")
    add(
        "evaluate",
        ["evaluate", "--model", model, "--val-data", uri("prepare")],
        cfg.evaluate,
        {"model": model, "val_data": uri("prepare")},
    )
    add(
        "promote",
        [
            "promote",
            "--candidate",
            uri("evaluate"),
            "--model",
            model,
            "--target",
            layout.champion_uri,
        ],
        cfg.promote,
        {"candidate": uri("evaluate"), "model": model},
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
        proc = subprocess.Popen(self.command(call, run_id), stderr=subprocess.PIPE)
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


def _log_key(stage: str, attempt: int) -> str:
    return f"{stage}-attempt-{attempt}.log"


_ATTEMPT_IN_LOG_KEY = re.compile(r"-attempt-(\d+)\.log$")  # of a _log_key name


def _save_log(layout: RunLayout, stage: str, attempt: int, outcome: Outcome) -> str:
    logs_store = open_store(layout.logs_uri)
    key = _log_key(stage, attempt)
    logs_store.put_bytes(key, outcome.log_tail.encode())
    return f"{logs_store.uri}/{key}"


def _attempts_logged(layout: RunLayout, stage: str) -> int:
    """The highest attempt number of the stage with a saved log (0: none)."""
    used = 0
    for obj in open_store(layout.logs_uri).list():
        m = _ATTEMPT_IN_LOG_KEY.search(obj.key)
        if m and obj.key == _log_key(stage, int(m.group(1))):
            used = max(used, int(m.group(1)))
    return used


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
    with runlock.hold(open_store(layout.run_uri), layout.run_id, lock_ttl_s) as lock:
        return _run_stages(cfg, layout, executor, raw_uri, retry_delay_s, lock)


def _run_stages(
    cfg: config.PipelineConfig,
    layout: RunLayout,
    executor: Executor,
    raw_uri: str | None,
    retry_delay_s: float,
    lock: runlock.RunLock,
) -> RunReport:
    log = logs.get()
    report = RunReport(layout.run_id)
    for call in plan(cfg, layout, raw_uri):
        lock.check()
        name = call.stage.name
        out = open_store(call.out_uri)
        expected = expected_fingerprint(call)
        if is_done(out, expected):
            log.info("stage_skipped", step=name, reason="done with the same inputs and settings")
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
            log.info("stage_start", step=name, attempt=attempt, pool=call.stage.pool)
            outcome = executor.run(call, layout.run_id, attempt)
            lock.check()
            if outcome.status == "succeeded":
                if not is_done(out, expected):
                    raise StageFailed(name, "exited 0 but committed no manifest for these inputs")
                break
            saved = _save_log(layout, name, attempt, outcome)
            if outcome.status == "preempted":
                preemptions += 1
                log.warning("stage_preempted", step=name, attempt=attempt, detail=outcome.detail)
                if preemptions > MAX_PREEMPTIONS:
                    raise StageFailed(name, f"preempted {preemptions} times; log: {saved}")
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
                raise StageFailed(name, f"{outcome.detail} after {tries} attempts; log: {saved}")
            time.sleep(retry_delay_s * 2 ** (failures - 1))
        seconds = time.monotonic() - start
        log.info("stage_done", step=name, attempts=tries, seconds=round(seconds, 1))
        report.stages.append(StageReport(name, "done", tries, seconds, call.out_uri))
    return report
