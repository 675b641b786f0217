"""One POST when a run ends (off unless `WEBHOOK_ENV` is set): Slack-compatible JSON.

The body has a `text` line (Slack incoming webhooks) and the same facts as fields for
generic receivers. Bounded retries with backoff; a failure is logged, never raised.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Mapping
from typing import Any

from skinlesion import logs

WEBHOOK_ENV = "SKINLESION_WEBHOOK_URL"
ATTEMPTS = 3
BACKOFF_S = 0.5
TIMEOUT_S = 5.0
HEADLINE = ("balanced_accuracy", "roc_auc_macro", "mel_recall", "macro_f1")


def url() -> str | None:
    return os.environ.get(WEBHOOK_ENV) or None


def body(run_id: str, status: str, facts: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON sent: `text` (one readable line) plus every fact as its own field."""
    parts = [f"skinlesion run {run_id}: {status}"]
    if facts.get("failed_stage"):
        parts.append(f"failed stage {facts['failed_stage']} (log: {facts.get('log_uri') or '-'})")
    metrics = facts.get("metrics") or {}
    shown = ", ".join(f"{k} {metrics[k]:.3f}" for k in HEADLINE if k in metrics)
    if shown:
        parts.append(shown)
    if facts.get("promoted") is not None:
        parts.append("promoted" if facts["promoted"] else "not promoted")
    if facts.get("report_uri"):
        parts.append(f"report: {facts['report_uri']}")
    return {"text": "; ".join(parts), "run_id": run_id, "status": status, **facts}


def notify(run_id: str, status: str, facts: Mapping[str, Any]) -> bool:
    """POST the run-end body; True when a 2xx came back within the bounded retries."""
    target = url()
    if target is None:
        return False
    data = json.dumps(body(run_id, status, facts), default=str).encode()
    error = ""
    for attempt in range(1, ATTEMPTS + 1):
        request = urllib.request.Request(
            target, data=data, method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                response.read()
            return True
        except (OSError, ValueError) as exc:  # HTTPError (non-2xx) and URLError are OSErrors
            error = str(exc)[:200]
        if attempt < ATTEMPTS:
            time.sleep(BACKOFF_S * 2 ** (attempt - 1))
    logs.get().warning("webhook_failed", run_id=run_id, attempts=ATTEMPTS, error=error)
    return False
