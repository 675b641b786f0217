"""`skinlesion gc` (retention): delete old runs' outputs, never what the champion was built from.

Runs are ordered by their newest committed stage. Kept: the newest `keep_last`, any run
newer than `older_than_days` (when given), any run whose lock is held (running), and the
run the champion's model and evaluation come from (its whole lineage: data, model,
evaluation). A deleted run is uncommitted stage by stage (manifest first), then emptied,
so nothing half-deleted ever reads as finished: a rerun of its id recomputes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from skinlesion import logs, runlock
from skinlesion.errors import InputError
from skinlesion.layout import RunLayout, champion_uri, run_of
from skinlesion.manifest import MANIFEST, read_manifest
from skinlesion.run_status import run_ids
from skinlesion.stages import STAGES
from skinlesion.storage import open_store


@dataclass(frozen=True)
class Decision:
    run_id: str
    newest: str | None  # the newest stage commit (ISO time)
    keep: bool
    why: str
    objects: int  # under the run's prefix


def _newest(layout: RunLayout) -> str | None:
    times = []
    for stage in STAGES:
        manifest = read_manifest(open_store(layout.stage_uri(stage.name)))
        if manifest is not None and isinstance(manifest.get("created_at"), str):
            times.append(manifest["created_at"])
    return max(times, default=None)


def _champion_runs(store_uri: str) -> set[str]:
    """The runs the champion's model and evaluation prefixes lie in."""
    champion = read_manifest(open_store(champion_uri(store_uri)))
    if champion is None:
        return set()
    uris = (str(champion.get(key) or "") for key in ("model_uri", "evaluation_uri"))
    runs = {run for run in (run_of(store_uri, uri) for uri in uris) if run}
    if isinstance(champion.get("run_id"), str):
        runs.add(champion["run_id"])
    return runs


def plan(store_uri: str, keep_last: int, older_than_days: float | None = None) -> list[Decision]:
    """What `gc` would delete and keep, newest run first."""
    if keep_last < 0:
        raise InputError(f"--keep-last must be >= 0, got {keep_last}")
    if older_than_days is not None and older_than_days < 0:
        raise InputError(f"--older-than must be >= 0 days, got {older_than_days}")
    protected = _champion_runs(store_uri)
    cutoff = (
        datetime.now(UTC) - timedelta(days=older_than_days) if older_than_days is not None else None
    )
    found = []
    for run_id in run_ids(store_uri):
        layout = RunLayout(store_uri, run_id)
        found.append((layout, _newest(layout)))
    found.sort(key=lambda item: item[1] or "", reverse=True)
    decisions = []
    for rank, (layout, newest) in enumerate(found):
        run_store = open_store(layout.run_uri)
        count = len(run_store.list())
        if rank < keep_last:
            keep, why = True, f"among the newest {keep_last}"
        elif layout.run_id in protected:
            keep, why = True, "the champion was built from it"
        elif runlock.holder(run_store) is not None:
            keep, why = True, "running (its lock is held)"
        elif cutoff is not None and newest is not None and datetime.fromisoformat(newest) > cutoff:
            keep, why = True, f"newer than {older_than_days:g} days"
        else:
            keep, why = False, "old"
        decisions.append(Decision(layout.run_id, newest, keep, why, count))
    return decisions


def delete_run(store_uri: str, run_id: str) -> int:
    """Uncommit every stage of the run (manifest first), then delete its objects."""
    layout = RunLayout(store_uri, run_id)
    for stage in STAGES:
        open_store(layout.stage_uri(stage.name)).delete(MANIFEST)
    run_store = open_store(layout.run_uri)
    objects = run_store.list()
    for obj in objects:
        run_store.delete(obj.key)
    return len(objects)


def collect(
    store_uri: str, keep_last: int, older_than_days: float | None, dry_run: bool
) -> list[dict[str, Any]]:
    log = logs.get()
    rows = []
    for d in plan(store_uri, keep_last, older_than_days):
        deleted = 0
        if not d.keep and not dry_run:
            deleted = delete_run(store_uri, d.run_id)
        action = "keep" if d.keep else ("would delete" if dry_run else "deleted")
        log.info("gc", run_id=d.run_id, action=action, why=d.why, objects=d.objects)
        rows.append({**d.__dict__, "action": action, "deleted_objects": deleted})
    return rows
