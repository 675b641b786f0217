"""MLflow tracking, off unless `MLFLOW_TRACKING_URI` is set: the only module importing mlflow
(the optional extra `skinlesion[mlflow]`).

One MLflow run per pipeline run, in the experiment `MLFLOW_EXPERIMENT_NAME` (default
`skinlesion`), found by its tag `skinlesion.run_id`: the run loop and every stage process
log into the same MLflow run, across processes, pods and resumes. MLflow's own variables
configure the client (`MLFLOW_TRACKING_USERNAME` / `_PASSWORD` / `_TOKEN`, ...).

A failure to log (server down, bad credentials, mlflow not installed) is one log line
(`mlflow_failed`) and turns MLflow off for the rest of the process: it never fails a stage
or the run. The client's HTTP retries are bounded (`HTTP_DEFAULTS`, unless set) so that an
unreachable server costs seconds, not minutes.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from skinlesion import logs

TRACKING_ENV = "MLFLOW_TRACKING_URI"
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
MODEL_ENV = "SKINLESION_MLFLOW_MODEL"  # the registered model's name
DEFAULT_EXPERIMENT = "skinlesion"
DEFAULT_MODEL = "skinlesion"
RUN_TAG = "skinlesion.run_id"
VERSION_TAG = "skinlesion.version"  # on a model version: the store registry's version
CHAMPION = "champion"
MODEL_ARTIFACT = "model"
STATUSES = {"succeeded": "FINISHED", "failed": "FAILED", "cancelled": "KILLED"}
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
_BATCH = 100  # params per log_batch call (the server's limit)
_USERINFO = re.compile(r"//[^/@\s]+@")

T = TypeVar("T")


class _Session:
    """This process's client and the MLflow run id of each pipeline run it logged to."""

    def __init__(self) -> None:
        self.client: Any = None
        self.runs: dict[str, str] = {}
        self.off = False


_session = _Session()


def enabled() -> bool:
    return bool(os.environ.get(TRACKING_ENV)) and not _session.off


def guarded(what: str, fn: Callable[[], T]) -> T | None:
    """Run `fn` unless MLflow is off; any failure is one log line, then MLflow is off."""
    if not enabled():
        return None
    try:
        return fn()
    except Exception as exc:  # the client raises many kinds; none may fail a stage
        _session.off = True
        error = _USERINFO.sub("//***@", " ".join(str(exc).split()))[:300]
        logs.get().warning("mlflow_failed", what=what, error=f"{type(exc).__name__}: {error}")
        return None


def _client() -> Any:
    if _session.client is None:
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        try:
            from mlflow import MlflowClient
        except ImportError:
            raise RuntimeError(
                f"{TRACKING_ENV} is set but mlflow is not installed: "
                "pip install 'skinlesion[mlflow]'"
            ) from None
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its INFO lines are not JSON
        _session.client = MlflowClient()
    return _session.client


def _experiment_id(client: Any) -> str:
    name = os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    try:
        return str(client.create_experiment(name))
    except Exception:  # created by another process meanwhile
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return str(found.experiment_id)


def _run_id(run_id: str) -> str:
    """The MLflow run of pipeline run `run_id`: found by tag, else created. Two processes
    creating it at once both keep the oldest and delete their own."""
    if run_id in _session.runs:
        return _session.runs[run_id]
    client = _client()
    experiment = _experiment_id(client)

    def oldest() -> Any:
        found = client.search_runs(
            [experiment],
            filter_string=f"tags.`{RUN_TAG}` = '{run_id}'",
            order_by=["attributes.start_time ASC"],
            max_results=1,
        )
        return found[0] if found else None

    run = oldest()
    if run is None:
        mine = client.create_run(experiment, tags={RUN_TAG: run_id}, run_name=run_id)
        run = oldest()
        if run.info.run_id != mine.info.run_id:
            client.delete_run(mine.info.run_id)
    _session.runs[run_id] = run.info.run_id
    return str(run.info.run_id)


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = str(value)
    return out


def _finite(values: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


# --- what the run loop and the stages log -------------------------------------------------


def start_run(run_id: str, params: Mapping[str, Any]) -> None:
    """The run loop's start: the MLflow run (RUNNING again on a resume) and the resolved
    config as params."""

    def go() -> None:
        client, rid = _client(), _run_id(run_id)
        if client.get_run(rid).info.status != "RUNNING":
            client.update_run(rid, status="RUNNING")
        _log_params(rid, params)

    guarded("start_run", go)


def end_run(run_id: str, status: str) -> None:
    """The run loop's end: FINISHED, FAILED or KILLED for succeeded, failed, cancelled."""
    guarded("end_run", lambda: _client().set_terminated(_run_id(run_id), STATUSES[status]))


def log_params(run_id: str, params: Mapping[str, Any]) -> None:
    """Nested settings as `section.field` params. MLflow params never change: a value that
    differs from the one logged first (a rerun with other settings) is named in a warning."""
    guarded("log_params", lambda: _log_params(_run_id(run_id), params))


def _log_params(rid: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    client = _client()
    logged = client.get_run(rid).data.params
    flat = _flatten(params)
    changed = sorted(k for k, v in flat.items() if k in logged and logged[k] != v)
    if changed:
        logs.get().warning("mlflow_params_kept", params=changed, reason="MLflow params are fixed")
    new = [Param(k, v) for k, v in flat.items() if k not in logged]
    for i in range(0, len(new), _BATCH):
        client.log_batch(rid, params=new[i : i + _BATCH])


def log_metrics(run_id: str, metrics: Mapping[str, Any], step: int = 0) -> None:
    """Numbers of `metrics` (non-finite ones dropped) at `step`."""

    def go() -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(k, v, now, step) for k, v in _finite(metrics).items()]
        if rows:
            _client().log_batch(_run_id(run_id), metrics=rows)

    guarded("log_metrics", go)


def log_epochs(
    run_id: str, rows: Sequence[tuple[int, Mapping[str, Any]]], key: str, only_missing: bool
) -> None:
    """Per-epoch figures as metrics with the epoch as step. `only_missing`: skip the epochs
    the metric `key` already has (a resumed stage replays its history without duplicates)."""

    def go() -> None:
        from mlflow.entities import Metric

        client, rid = _client(), _run_id(run_id)
        have = {m.step for m in client.get_metric_history(rid, key)} if only_missing else set()
        now = int(time.time() * 1000)
        metrics = [
            Metric(name, value, now, step)
            for step, figures in rows
            if step not in have
            for name, value in _finite(figures).items()
        ]
        for i in range(0, len(metrics), 1000):
            client.log_batch(rid, metrics=metrics[i : i + 1000])

    guarded("log_epochs", go)


def set_tags(run_id: str, tags: Mapping[str, Any]) -> None:
    def go() -> None:
        client, rid = _client(), _run_id(run_id)
        for key, value in tags.items():
            client.set_tag(rid, key, str(value))

    guarded("set_tags", go)


def log_artifacts(run_id: str, files: Iterable[tuple[Path, str]]) -> None:
    """Each (local file, artifact directory)."""

    def go() -> None:
        client, rid = _client(), _run_id(run_id)
        for path, artifact_dir in files:
            client.log_artifact(rid, str(path), artifact_dir)

    guarded("log_artifacts", go)


def register_champion(run_id: str, model_file: Path, version: int | None) -> str | None:
    """Log the promoted model as the run's `model` artifact, register it (once per store
    version) under `SKINLESION_MLFLOW_MODEL` and point the alias `champion` at it; returns
    the MLflow model version."""

    def go() -> str:
        client, rid = _client(), _run_id(run_id)
        name = os.environ.get(MODEL_ENV) or DEFAULT_MODEL
        try:
            client.create_registered_model(name)
        except Exception:
            client.get_registered_model(name)  # raises unless it exists (made earlier)
        existing = [
            mv
            for mv in client.search_model_versions(f"name = '{name}' and run_id = '{rid}'")
            if mv.tags.get(VERSION_TAG) == str(version)
        ]
        if existing:
            mv = existing[0]
        else:
            client.log_artifact(rid, str(model_file), MODEL_ARTIFACT)
            mv = client.create_model_version(
                name,
                f"runs:/{rid}/{MODEL_ARTIFACT}",
                run_id=rid,
                tags={RUN_TAG: run_id, VERSION_TAG: str(version)},
            )
        client.set_registered_model_alias(name, CHAMPION, mv.version)
        return str(mv.version)

    return guarded("register_champion", go)


def move_champion(version: int) -> str | None:
    """Point the alias `champion` at the MLflow model version of store registry version
    `version` (`models rollback`); None, logged, when MLflow has no such version."""

    def go() -> str | None:
        client = _client()
        name = os.environ.get(MODEL_ENV) or DEFAULT_MODEL
        found = [
            mv
            for mv in client.search_model_versions(f"name = '{name}'")
            if mv.tags.get(VERSION_TAG) == str(version)
        ]
        if not found:
            logs.get().warning("mlflow_version_unknown", model=name, version=version)
            return None
        client.set_registered_model_alias(name, CHAMPION, found[0].version)
        return str(found[0].version)

    return guarded("move_champion", go)
