"""`skinlesion runs list|show`: every run in a store and where each stage stands, read
from the store alone (manifests, attempt logs, the run lock, the cancel mark).

A stage is `done` (committed by this manifest schema), `running` (the run's lock is held
and it is the run's first unfinished stage), `cancelled` (the run carries a cancel mark
and this is where it stopped), `failed` (attempts logged, not done, not running) or
`pending` (no trace yet); a stage before the last finished one that never ran was left
out by the run's config (augment disabled, no fine-tune epochs) and is not listed. A run
is `done` once promote is, else the state of its first unfinished stage.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from skinlesion import cancel, runlock
from skinlesion.layout import RUNS, RunLayout
from skinlesion.manifest import read_manifest
from skinlesion.results import SCHEMA_VERSION, VERSION_FIELD, EvaluateResult, PromoteResult
from skinlesion.results import parse_result as _parse
from skinlesion.stages import STAGES
from skinlesion.storage import open_store


@dataclass(frozen=True)
class StageStatus:
    stage: str
    state: str  # done | running | cancelled | failed | pending
    attempts: int  # started attempts that this store knows of
    seconds: float | None  # of the committing attempt
    finished_at: str | None


@dataclass(frozen=True)
class RunStatus:
    run_id: str
    state: str
    stages: list[StageStatus]
    metrics: dict[str, Any] | None = None  # evaluate's headline figures
    promotion: dict[str, Any] | None = None  # {promoted, reason}
    holder: str | None = None  # who holds the run lock, while it runs
    cancelled: dict[str, Any] | None = field(default=None)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def run_ids(store_uri: str) -> list[str]:
    """The runs of a store, in name order."""
    keys = open_store(store_uri).list(RUNS)
    return sorted({k.key.split("/")[1] for k in keys if k.key.count("/") >= 2})


def _seconds(manifest: dict[str, Any]) -> float | None:
    try:
        start = datetime.fromisoformat(manifest["started_at"])
        end = datetime.fromisoformat(manifest["created_at"])
    except (KeyError, TypeError, ValueError):
        return None
    return (end - start).total_seconds()


def run_status(store_uri: str, run_id: str) -> RunStatus:
    layout = RunLayout(store_uri, run_id)
    logs = open_store(layout.logs_uri).list()
    held = runlock.holder(open_store(layout.run_uri))
    mark = cancel.cancelled(layout)
    manifests: dict[str, dict[str, Any]] = {}
    failures: dict[str, int] = {}
    for stage in STAGES:
        manifest = read_manifest(open_store(layout.stage_uri(stage.name)))
        if manifest is not None and manifest.get(VERSION_FIELD) == SCHEMA_VERSION:
            manifests[stage.name] = manifest
        logged = (layout.logged_attempt(stage.name, o.key) for o in logs)
        failures[stage.name] = max((n for n in logged if n), default=0)
    names = [s.name for s in STAGES]
    last_done = max((i for i, n in enumerate(names) if n in manifests), default=-1)
    frontier = next((n for n in names[last_done + 1 :]), None)  # where the run stands
    stages: list[StageStatus] = []
    for i, name in enumerate(names):
        tries = failures[name]
        if name in manifests:
            m = manifests[name]
            stages.append(StageStatus(name, "done", tries + 1, _seconds(m), m["created_at"]))
            continue
        if i < last_done:  # later stages are done: this run's config leaves it out
            continue
        if name == frontier and held is not None:
            state, tries = "running", tries + 1
        elif name == frontier and mark is not None:
            state = "cancelled"
        else:
            state = "failed" if tries else "pending"
        stages.append(StageStatus(name, state, tries, None, None))
    if "promote" in manifests:
        state = "done"
    else:
        state = next((s.state for s in stages if s.state != "done"), "pending")
    metrics = promotion = None
    if "evaluate" in manifests:
        metrics = _parse(EvaluateResult, manifests["evaluate"], f"{run_id}/evaluate").metrics
    if "promote" in manifests:
        decision = _parse(PromoteResult, manifests["promote"], f"{run_id}/promote").decision
        promotion = {"promoted": decision["promoted"], "reason": decision["reason"]}
    return RunStatus(
        run_id,
        state,
        stages,
        metrics,
        promotion,
        held.describe() if held is not None else None,
        mark,
    )


def format_list(statuses: list[RunStatus]) -> str:
    lines = [f"{'run':<24}{'state':<11}{'stages done':<13}{'balanced acc':<14}promoted"]
    for s in statuses:
        done = sum(st.state == "done" for st in s.stages)
        bal = (s.metrics or {}).get("balanced_accuracy")
        promoted = "-" if s.promotion is None else ("yes" if s.promotion["promoted"] else "no")
        lines.append(
            f"{s.run_id:<24}{s.state:<11}{f'{done}/{len(s.stages)}':<13}"
            f"{'-' if bal is None else f'{bal:.3f}':<14}{promoted}"
        )
    return "\n".join(lines)


def format_show(s: RunStatus) -> str:
    lines = [f"run {s.run_id}: {s.state}"]
    if s.holder:
        lines.append(f"held by {s.holder}")
    if s.cancelled:
        lines.append(f"cancelled at {s.cancelled.get('cancelled_at')} by {s.cancelled.get('by')}")
    lines.append(f"{'stage':<10}{'state':<11}{'attempts':<10}{'seconds':<10}finished")
    for st in s.stages:
        secs = "-" if st.seconds is None else f"{st.seconds:.0f}"
        lines.append(
            f"{st.stage:<10}{st.state:<11}{st.attempts:<10}{secs:<10}{st.finished_at or '-'}"
        )
    if s.metrics:
        lines.append("metrics: " + json.dumps(s.metrics, sort_keys=True))
    if s.promotion:
        verdict = "promoted" if s.promotion["promoted"] else "not promoted"
        lines.append(f"promotion: {verdict} ({s.promotion['reason']})")
    return "\n".join(lines)
