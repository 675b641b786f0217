"""What the run loop reports when a run ends: the Pushgateway run push, the webhook and the
MLflow run's status."""

from __future__ import annotations

import re
from typing import Any

from skinlesion.errors import RunCancelled, StageFailed
from skinlesion.layout import REPORT_FILE, RunLayout
from skinlesion.manifest import read_manifest
from skinlesion.obs import mlflow_log, pushgateway, webhook
from skinlesion.storage import open_store

_LOG_URI = re.compile(r"log: (\S+)")


def status_of(exc: BaseException | None) -> str:
    if exc is None:
        return "succeeded"
    return "cancelled" if isinstance(exc, RunCancelled) else "failed"


def facts(layout: RunLayout, exc: BaseException | None) -> dict[str, Any]:
    """Failed stage and its log URI, headline metrics, promotion decision, report URI."""
    out: dict[str, Any] = {}
    if isinstance(exc, StageFailed):
        out["failed_stage"] = exc.stage
        found = _LOG_URI.search(str(exc))
        out["log_uri"] = found.group(1) if found else None
    if exc is not None:
        out["error"] = str(exc)[:500]
    try:
        evaluation = read_manifest(open_store(layout.stage_uri("evaluate")))
        promotion = read_manifest(open_store(layout.stage_uri("promote")))
    except Exception:
        evaluation = promotion = None
    if evaluation:
        out["metrics"] = evaluation.get("metrics")
        out["report_uri"] = f"{layout.stage_uri('evaluate')}/{REPORT_FILE}"
    if promotion:
        decision = promotion.get("decision") or promotion
        out["promoted"] = decision.get("promoted")
        out["promotion_reason"] = decision.get("reason")
    return out


def report(layout: RunLayout, exc: BaseException | None, seconds: float, done: int) -> None:
    """Push the run's state, notify, end the MLflow run; each optional and never raising."""
    status = status_of(exc)
    mlflow_log.end_run(layout.run_id, status)
    if pushgateway.url() is None and webhook.url() is None:
        return
    pushgateway.push_run(layout.run_id, status, seconds, done)
    webhook.notify(layout.run_id, status, facts(layout, exc))
