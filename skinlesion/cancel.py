"""Cancelling a run: a mark in the store that the run loop obeys, and (on Kubernetes)
the run's Jobs deleted with their pods.

`runs/<id>/cancelled.json` records when and by whom. The run loop checks it before each
stage attempt and after each attempt ends, and stops with RunCancelled (exit 5); a later
run of the same id removes the mark when it starts and resumes where the cancelled one
stopped (finished stages are skipped, training resumes from its saved state).
"""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from skinlesion import logs
from skinlesion.errors import RunCancelled
from skinlesion.kube_jobs import LABEL_INSTANCE, LABEL_RUN_ID, LABEL_STAGE
from skinlesion.layout import CANCELLED, RunLayout
from skinlesion.storage import get_json, open_store, put_json

if TYPE_CHECKING:
    from skinlesion.kube import Kube


def mark(layout: RunLayout, reason: str = "cancelled by a user") -> dict[str, Any]:
    record = {
        "run_id": layout.run_id,
        "cancelled_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "by": f"{os.environ.get('USER') or 'unknown'}@{socket.gethostname()}",
        "reason": reason,
    }
    put_json(open_store(layout.run_uri), CANCELLED, record)
    return record


def cancelled(layout: RunLayout) -> dict[str, Any] | None:
    store = open_store(layout.run_uri)
    if not store.exists(CANCELLED):
        return None
    record = get_json(store, CANCELLED)
    return record if isinstance(record, dict) else {"reason": "cancelled"}


def check(layout: RunLayout) -> None:
    """Raise RunCancelled when the run carries a cancel mark."""
    record = cancelled(layout)
    if record is not None:
        raise RunCancelled(
            f"run '{layout.run_id}' was cancelled at {record.get('cancelled_at', '?')} by "
            f"{record.get('by', '?')}; rerun the same run id to resume"
        )


def clear(layout: RunLayout) -> None:
    """A new run of the id resumes: the earlier cancel no longer applies."""
    store = open_store(layout.run_uri)
    if store.exists(CANCELLED):
        store.delete(CANCELLED)
        logs.get().info("cancel_mark_cleared", run=layout.run_uri)


def delete_jobs(kube: Kube, namespace: str, release: str, run_id: str) -> list[str]:
    """Delete the run's Jobs (the controller's first, so that it does not retry a deleted
    stage Job) with their pods (background propagation); their names."""
    selector = f"{LABEL_INSTANCE}={release},{LABEL_RUN_ID}={run_id}"
    jobs, _ = kube.list_jobs(namespace, label_selector=selector)

    def order(job: dict[str, Any]) -> int:
        labels = (job.get("metadata") or {}).get("labels") or {}
        return 0 if labels.get(LABEL_STAGE) == "controller" else 1

    deleted = []
    for job in sorted(jobs, key=order):
        name = str(job["metadata"]["name"])
        if kube.delete_job(namespace, name):
            deleted.append(name)
    return deleted
