"""Stage Jobs as data: their names, labels and shape, and how to read their end.

Pure functions over plain dicts (the API's JSON); the calls to the API server are
`kube_executor`'s. A stage Job is built from the stage's shape in the chart's stages
file (a complete batch/v1 Job without name and args), named
`<release>-<stage>-<run-id>[-a<attempt>]` and labelled with the release, stage, run id
and attempt.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from skinlesion import config
from skinlesion.errors import ConfigError, InputError
from skinlesion.keys import safe_run_id

if TYPE_CHECKING:
    from skinlesion.pipeline import StageCall

CONTAINER = "stage"  # the container of a stage Job that gets the stage's arguments
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_STAGE = "app.kubernetes.io/component"
LABEL_RUN_ID = "skinlesion.io/run-id"
LABEL_ATTEMPT = "skinlesion.io/attempt"
JOB_NAME_LABELS = ("batch.kubernetes.io/job-name", "job-name")  # set on a Job's pods
JOB_NAME_ENV = "SKINLESION_JOB_NAME"  # the controller's own Job name (--run-id-from-job)
# A Job name leaves room for "-<index>": the pods of an Indexed Job (a multi-worker stage)
# are named, and their hostnames set, <job-name>-<completion index>, a DNS label too.
_MAX_NAME = 63 - len("-999")
_EXIT_CODE_IN_MESSAGE = re.compile(r"failed with exit code (\d+)")


# --- the stages file ----------------------------------------------------------------------


@dataclass(frozen=True)
class OomRetry:
    """How a stage retried after an OOMKilled pod gets more memory: its container's memory
    limit times `factor` per OOM, at most `max_memory_bytes` (0: 4x the shape's limit)."""

    factor: float = 2.0
    max_memory_bytes: int = 0


@dataclass(frozen=True)
class StagesFile:
    release: str | None
    namespace: str | None
    store: str | None
    jobs: Mapping[str, dict[str, Any]]  # stage -> Job shape
    oom: Mapping[str, OomRetry] = field(default_factory=dict)  # stage -> its OOM retry


def load_stages(path: str) -> StagesFile:
    """Read and check the chart's stages file; errors name the file and the stage."""
    data = config.read_yaml(path)
    stages = data.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise ConfigError("stages", f"{path}: needs a 'stages' mapping of stage -> {{job: …}}")
    jobs: dict[str, dict[str, Any]] = {}
    oom: dict[str, OomRetry] = {}
    for stage, entry in stages.items():
        job = entry.get("job") if isinstance(entry, dict) else None
        where = f"{path}: stages.{stage}.job"
        if not isinstance(job, dict) or job.get("kind", "Job") != "Job":
            raise ConfigError("stages", f"{where}: must be a batch/v1 Job manifest")
        containers = (((job.get("spec") or {}).get("template") or {}).get("spec") or {}).get(
            "containers"
        ) or []
        if not any(isinstance(c, dict) and c.get("name") == CONTAINER for c in containers):
            raise ConfigError("stages", f"{where}: has no container named '{CONTAINER}'")
        jobs[str(stage)] = job
        oom[str(stage)] = _oom_retry(entry.get("oomRetry") or {}, f"{path}: stages.{stage}")
    return StagesFile(
        release=data.get("release") or None,
        namespace=data.get("namespace") or None,
        store=data.get("store") or None,
        jobs=jobs,
        oom=oom,
    )


def _oom_retry(entry: Mapping[str, Any], where: str) -> OomRetry:
    factor = entry.get("factor", OomRetry.factor)
    if not isinstance(factor, int | float) or isinstance(factor, bool) or not 1 <= factor <= 16:
        raise ConfigError("stages", f"{where}.oomRetry.factor: must be a number in [1, 16]")
    cap = entry.get("maxMemory") or ""
    try:
        return OomRetry(float(factor), parse_quantity(str(cap)) if cap else 0)
    except ValueError as exc:
        raise ConfigError("stages", f"{where}.oomRetry.maxMemory: {exc}") from None


# --- memory limits (Kubernetes quantities) -----------------------------------------------

_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
_UNITS = {
    **{s: 1024 ** (i + 1) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))},
    **{s: 1000 ** (i + 1) for i, s in enumerate(("k", "M", "G", "T", "P", "E"))},
}


def parse_quantity(text: str) -> int:
    """Bytes of a memory quantity such as `8Gi`, `512Mi`, `1G` or `1000000`."""
    m = _QUANTITY.match(text.strip())
    if not m:
        raise ValueError(f"not a memory quantity: {text!r} (e.g. 8Gi, 512Mi)")
    return int(float(m.group(1)) * _UNITS.get(m.group(2) or "", 1))


def format_quantity(size: int) -> str:
    """Bytes as the largest binary unit that keeps an integer (`16Gi`), else Mi rounded up."""
    for unit in ("Ei", "Pi", "Ti", "Gi", "Mi"):
        if size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return f"{-(-size // _UNITS['Mi'])}Mi"


def stage_container(pod_spec: Mapping[str, Any]) -> dict[str, Any]:
    """The stage container of a pod spec (a Job's template's, or a pod's)."""
    for container in pod_spec.get("containers") or []:
        if container.get("name") == CONTAINER:
            return container  # type: ignore[no-any-return]
    raise ConfigError("stages", f"the pod spec has no container named '{CONTAINER}'")


def memory_limit(pod_spec: Mapping[str, Any]) -> int | None:
    """The stage container's memory limit in bytes (None: no limit)."""
    resources = stage_container(pod_spec).get("resources") or {}
    limit = (resources.get("limits") or {}).get("memory")
    return parse_quantity(str(limit)) if limit is not None else None


def raised_memory_limit(current: int, retry: OomRetry, shape_limit: int) -> int:
    """The limit of the attempt after an OOM kill: current x factor, at most the cap."""
    cap = retry.max_memory_bytes or 4 * shape_limit
    return max(current, min(int(current * retry.factor), cap))


# --- names --------------------------------------------------------------------------------


def job_name(release: str, stage: str, run_id: str, attempt: int) -> str:
    """`<release>-<stage>-<run-id>`, `-a<attempt>` from the second attempt, <= 59 chars.

    A long release is shortened (never the stage or run id, which keep names unique).
    """
    rest = f"-{stage}-{run_id}" + (f"-a{attempt}" if attempt > 1 else "")
    prefix = release[: max(1, _MAX_NAME - len(rest))].rstrip("-.") or "s"
    return f"{prefix}{rest}"[:_MAX_NAME]


def run_id_from_job_name(name: str, release: str | None = None) -> str:
    """A valid run id from a Job name (e.g. `<release>-retrain-28934560` of a CronJob).

    The release prefix is dropped; what is left keeps the unique tail and is shortened
    with a hash when longer than a run id may be.
    """
    text = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if release and text.startswith(f"{release}-") and len(text) > len(release) + 1:
        text = text[len(release) + 1 :]
    if len(text) > 40:
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        text = f"{text[:31].rstrip('-')}-{digest}"
    if not text:
        raise InputError(f"cannot derive a run id from Job name {name!r}")
    return safe_run_id(text)


def labels(release: str, stage: str, run_id: str, attempt: int) -> dict[str, str]:
    return {
        LABEL_INSTANCE: release,
        LABEL_STAGE: stage,
        LABEL_RUN_ID: run_id,
        LABEL_ATTEMPT: str(attempt),
    }


def stage_selector(release: str, stage: str, run_id: str) -> str:
    """The label selector of every Job (any attempt) of one stage of one run."""
    return ",".join(
        f"{k}={v}"
        for k, v in ((LABEL_INSTANCE, release), (LABEL_RUN_ID, run_id), (LABEL_STAGE, stage))
    )


def attempt_of(job: Mapping[str, Any]) -> int:
    """The attempt number a Job is labelled with (0: none)."""
    value = ((job.get("metadata") or {}).get("labels") or {}).get(LABEL_ATTEMPT, "0")
    return int(value) if str(value).isdigit() else 0


def build_job(
    stages: StagesFile,
    call: StageCall,
    namespace: str,
    release: str,
    run_id: str,
    attempt: int,
    memory: int | None = None,
) -> dict[str, Any]:
    """The stage's Job shape (deep-copied), named, labelled, with the stage's args (and
    `memory` bytes as the stage container's memory limit, when given)."""
    stage = call.stage.name
    shape = stages.jobs.get(stage)
    if shape is None:
        raise ConfigError("stages", f"the stages file has no Job shape for stage '{stage}'")
    job = copy.deepcopy(shape)
    job.setdefault("apiVersion", "batch/v1")
    job.setdefault("kind", "Job")
    ours = labels(release, stage, run_id, attempt)
    meta = job.setdefault("metadata", {})
    meta.pop("generateName", None)
    meta["name"] = job_name(release, stage, run_id, attempt)
    meta["namespace"] = namespace
    meta["labels"] = {**(meta.get("labels") or {}), **ours}
    template = job["spec"]["template"]
    tmeta = template.setdefault("metadata", {})
    tmeta["labels"] = {**(tmeta.get("labels") or {}), **ours}
    container = stage_container(template["spec"])
    # argv[0] is the subcommand, which jobs/<job>.py prepends itself.
    container["args"] = [*call.argv[1:], "--run-id", run_id]
    if memory is not None:  # raised after an OOM kill
        limits = container.setdefault("resources", {}).setdefault("limits", {})
        limits["memory"] = format_quantity(memory)
    return job


# --- reading a Job's end ------------------------------------------------------------------


def _conditions(obj: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [c for c in (obj.get("status") or {}).get("conditions") or [] if isinstance(c, dict)]


def job_state(job: Mapping[str, Any]) -> str | None:
    """ "Complete", "Failed", or None while the Job runs (terminal conditions only)."""
    for cond in _conditions(job):
        if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
            return str(cond["type"])
    return None


def failed_condition(job: Mapping[str, Any]) -> dict[str, Any]:
    for cond in _conditions(job):
        if cond.get("type") == "Failed" and cond.get("status") == "True":
            return cond
    return {}


def terminated(pod: Mapping[str, Any]) -> dict[str, Any]:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == CONTAINER:
            state = status.get("state") or {}
            last = status.get("lastState") or {}
            return dict(state.get("terminated") or last.get("terminated") or {})
    return {}


def disrupted(pod: Mapping[str, Any]) -> bool:
    return any(
        c.get("type") == "DisruptionTarget" and c.get("status") == "True" for c in _conditions(pod)
    )


def last_failed_pod(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"] or pods

    def when(pod: dict[str, Any]) -> str:
        return str(
            terminated(pod).get("finishedAt")
            or (pod.get("metadata") or {}).get("creationTimestamp")
            or ""
        )

    return max(failed, key=when) if failed else None


_EXIT_CODE_IN_MESSAGE = re.compile(r"failed with exit code (\d+)")


def exit_code_in_message(message: str) -> int | None:
    """The exit code a podFailurePolicy condition message names, if any."""
    m = _EXIT_CODE_IN_MESSAGE.search(message)
    return int(m.group(1)) if m else None
