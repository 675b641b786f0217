"""Push stage and run metrics to a Prometheus Pushgateway (off unless `PUSHGATEWAY_ENV` is set).

Text exposition format over a plain HTTP PUT to
`<url>/metrics/job/<job>/stage/<stage>/run_id/<id>` (the PUT replaces that group).
A push that fails is logged once and never fails the stage or the run.
"""

from __future__ import annotations

import math
import os
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping

from skinlesion import logs

PUSHGATEWAY_ENV = "SKINLESION_PUSHGATEWAY_URL"
ATTEMPT_ENV = "SKINLESION_ATTEMPT"  # set by the executors for the stage process
JOB = "skinlesion"
PREFIX = "skinlesion_"
TIMEOUT_S = 5.0
RUN_STATES = ("succeeded", "failed", "cancelled")
EVAL_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc_macro", "mel_recall", "ece")

_noted: dict[str, float] = {}  # figures a stage reports before it ends (note())


def url() -> str | None:
    return os.environ.get(PUSHGATEWAY_ENV) or None


def note(**figures: float | int | None) -> None:
    """Record figures of this stage process (images, eval_* metrics) for the exit push."""
    _noted.update({k: float(v) for k, v in figures.items() if isinstance(v, int | float)})


def note_manifest(manifest: Mapping[str, object]) -> None:
    """The figures a committed stage manifest holds: image count, evaluate's headline."""
    metrics = manifest.get("metrics")
    if isinstance(metrics, Mapping):
        note(images=metrics.get("n_images"), **{f"eval_{k}": metrics.get(k) for k in EVAL_METRICS})
    n = manifest.get("n_images", manifest.get("train_images"))
    if isinstance(n, int):
        note(images=n)


def exposition(samples: Mapping[str, float]) -> str:
    """Prometheus text format: one gauge per sample, names prefixed `skinlesion_`."""
    lines, typed = [], set()
    for name, value in samples.items():
        if not math.isfinite(value):
            continue
        family = name.split("{", 1)[0]
        if family not in typed:
            typed.add(family)
            lines.append(f"# TYPE {PREFIX}{family} gauge")
        lines.append(f"{PREFIX}{name} {value!r}")
    return "\n".join(lines) + "\n"


def push(stage: str, run_id: str, samples: Mapping[str, float], method: str = "PUT") -> bool:
    """Push `samples` as the group job/stage/run_id (PUT replaces the group, POST only the
    pushed names); False, logged, if the push failed."""
    base = url()
    if base is None:
        return False
    quote = urllib.parse.quote
    target = (
        f"{base.rstrip('/')}/metrics/job/{JOB}/stage/{quote(stage, safe='')}"
        f"/run_id/{quote(run_id or '-', safe='')}"
    )
    request = urllib.request.Request(
        target,
        data=exposition(samples).encode(),
        method=method,
        headers={"Content-Type": "text/plain; version=0.0.4"},
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            response.read()
        return True
    except (OSError, ValueError) as exc:  # URLError/HTTPError are OSErrors
        logs.get().warning("pushgateway_push_failed", stage=stage, error=str(exc)[:200])
        return False


def push_stage(stage: str, run_id: str, exit_code: int, seconds: float) -> bool:
    """The exit push of one stage process: duration, exit code, attempt, images, eval_*."""
    samples = {
        "stage_duration_seconds": seconds,
        "stage_exit_code": float(exit_code),
        "stage_attempt": float(os.environ.get(ATTEMPT_ENV, "1") or 1),
        "stage_end_timestamp_seconds": time.time(),
    }
    figures = dict(_noted)
    _noted.clear()  # pushed once
    if "images" in figures:
        samples["stage_images_total"] = figures.pop("images")
        if seconds > 0:
            samples["stage_images_per_second"] = samples["stage_images_total"] / seconds
    samples.update(figures)
    return push(stage, run_id, samples)


def push_run(run_id: str, state: str, seconds: float, stages_done: int) -> bool:
    """The run loop's push: one 0/1 gauge per state, and the last success's time
    (POST: a failed rerun of the run id keeps the earlier success's timestamp)."""
    samples = {f'run_state{{state="{s}"}}': float(s == state) for s in RUN_STATES}
    samples["run_duration_seconds"] = seconds
    samples["run_stages_done"] = float(stages_done)
    if state == "succeeded":
        samples["run_last_success_timestamp_seconds"] = time.time()
    return push("run", run_id, samples, method="POST")  # POST keeps the last success
