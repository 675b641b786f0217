"""`skinlesion controller`: one run of the stage list as Kubernetes Jobs, in order.

The ordering, skip-if-done, retries and preemption handling are the shared loop of
`pipeline.run_pipeline`; this module only knows how to run one stage as a Job:

- the Job is built from the stage's shape in the chart's stages file (a complete
  batch/v1 Job without name and args), named `<release>-<stage>-<run-id>[-a<attempt>]`
  and labelled with the release, stage, run id and attempt;
- it waits by watching the Job (never by sleeping), and turns the Job's end into an
  `Outcome`: Complete -> succeeded; Failed -> failed with the failed pod's exit code
  and log tail, or preempted when the pod was disrupted (node loss, preemption);
- it is restart-safe: a stage Job still running (its controller was restarted) is
  adopted and watched, never created twice; Jobs that had already ended before are
  history, and the next attempt takes the next free attempt number;
- a Lease `<release>-<run-id>`, renewed in the background, keeps a second controller
  for the same run id from proceeding; an expired Lease is taken over;
- SIGTERM (errors.Terminated) deletes the running Job (background propagation),
  releases the Lease and ends with exit code 143 (the CLI maps it).

`kubernetes` is imported only by `skinlesion.kube`, and only when a run starts.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from skinlesion import config, logs
from skinlesion.errors import ConfigError, InputError, SkinlesionError, Terminated
from skinlesion.keys import safe_run_id
from skinlesion.pipeline import STAGES, Outcome, RunLayout, StageCall, plan, run_pipeline

if TYPE_CHECKING:
    from skinlesion.kube import JobWatch, Kube

CONTAINER = "stage"  # the container of a stage Job that gets the stage's arguments
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_STAGE = "app.kubernetes.io/component"
LABEL_RUN_ID = "skinlesion.io/run-id"
LABEL_ATTEMPT = "skinlesion.io/attempt"
JOB_NAME_LABELS = ("batch.kubernetes.io/job-name", "job-name")  # set on a Job's pods
JOB_NAME_ENV = "SKINLESION_JOB_NAME"  # the controller's own Job name (--run-id-from-job)
LOG_TAIL_LINES = 100  # saved to the store (runs/<id>/logs/)
LOG_LINES_IN_LOG = 20  # of those, repeated in the controller's own log line
WATCH_TIMEOUT_S = 60.0  # one watch request; then it resumes from the last resourceVersion
# The pipeline-level retry creates a fresh Job at once: pod restarts with back-off are
# the Job's own business (backoffLimit), and a finished-to-next handoff stays < 2 s.
RETRY_DELAY_S = 0.0
_MAX_NAME = 63


class LeaseHeld(SkinlesionError):
    """Another live controller holds this run's Lease."""


class LeaseLost(SkinlesionError):
    """This controller could not renew its Lease in time; another one may drive the run."""


class _WaitTimeout(Exception):
    """--max-wait-s passed without the Job ending."""


# --- CLI --------------------------------------------------------------------------------------


def add_controller_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `skinlesion controller` beyond the shared run flags (cheap: no imports)."""
    # The stages file names the store; an explicit --store still wins.
    parser.set_defaults(store=None)
    parser.add_argument(
        "--stages",
        required=True,
        metavar="PATH",
        help="YAML from the Helm chart: {release, namespace, store, stages: {<stage>: {job: …}}}",
    )
    parser.add_argument(
        "--namespace", help="namespace of the stage Jobs (default: the stages file's)"
    )
    parser.add_argument(
        "--release", help="Helm release: Job name prefix and label (default: the stages file's)"
    )
    parser.add_argument(
        "--run-id-from-job",
        action="store_true",
        help=f"derive the run id from ${JOB_NAME_ENV} (the controller's own Job name, "
        "unique per CronJob run); overrides --run-id",
    )
    parser.add_argument(
        "--lease-seconds",
        type=float,
        default=30.0,
        help="Lease duration; renewed every third of it (default 30)",
    )
    parser.add_argument(
        "--max-wait-s",
        type=float,
        default=0.0,
        help="give up on a stage Job after this long (delete it; counts as a failed attempt); "
        "0 = no limit besides the Job's own activeDeadlineSeconds (default)",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)"
    )
    where.add_argument(
        "--in-cluster",
        action="store_true",
        default=None,
        help="use the pod's service account (default when $KUBERNETES_SERVICE_HOST is set)",
    )


# --- the stages file ----------------------------------------------------------------------


@dataclass(frozen=True)
class StagesFile:
    release: str | None
    namespace: str | None
    store: str | None
    jobs: Mapping[str, dict[str, Any]]  # stage -> Job shape


def load_stages(path: str) -> StagesFile:
    """Read and check the chart's stages file; errors name the file and the stage."""
    data = config.read_yaml(path)
    stages = data.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise ConfigError("stages", f"{path}: needs a 'stages' mapping of stage -> {{job: …}}")
    jobs: dict[str, dict[str, Any]] = {}
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
    return StagesFile(
        release=data.get("release") or None,
        namespace=data.get("namespace") or None,
        store=data.get("store") or None,
        jobs=jobs,
    )


# --- names --------------------------------------------------------------------------------


def job_name(release: str, stage: str, run_id: str, attempt: int) -> str:
    """`<release>-<stage>-<run-id>`, `-a<attempt>` from the second attempt, <= 63 chars.

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


def _identity() -> str:
    host = os.environ.get("HOSTNAME") or socket.gethostname()
    return f"{host}_{os.getpid()}_{uuid.uuid4().hex[:8]}"


def _now() -> datetime:
    return datetime.now(UTC)


def _micro(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


# --- the Lease ----------------------------------------------------------------------------


class RunLease:
    """A coordination.k8s.io/v1 Lease held for the whole run, renewed in the background.

    Every write is a replace carrying the resourceVersion that was read, so the API
    server's compare-and-swap decides races. A live lease held by someone else is
    observed for one lease duration (re-read every sixth of it, as client-go's leader
    election does): renewed -> refuse (LeaseHeld); not renewed -> expired, taken over.
    The holder gives up (LeaseLost) when it cannot renew within one lease duration,
    before anyone else may take over.
    """

    def __init__(
        self,
        kube: Kube,
        namespace: str,
        name: str,
        duration_s: float,
        labels: Mapping[str, str],
        identity: str | None = None,
    ) -> None:
        if duration_s < 1:
            raise ConfigError("lease_seconds", "must be >= 1")
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.duration_s = duration_s
        self.labels = dict(labels)
        self.identity = identity or _identity()
        self.lost = threading.Event()
        self._lease: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._on_lost: Callable[[], None] = lambda: None

    def _spec(self, transitions: int) -> dict[str, Any]:
        now = _micro(_now())
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.duration_s)),
            "acquireTime": now,
            "renewTime": now,
            "leaseTransitions": transitions,
        }

    def acquire(self) -> None:
        from skinlesion.kube import Conflict

        log = logs.get()
        observed: tuple[Any, ...] | None = None
        watch_until = 0.0
        while True:
            lease = self.kube.get_lease(self.namespace, self.name)
            if lease is None:
                fresh = {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {
                        "name": self.name,
                        "namespace": self.namespace,
                        "labels": self.labels,
                    },
                    "spec": self._spec(0),
                }
                try:
                    self._lease = self.kube.create_lease(self.namespace, fresh)
                except Conflict:
                    continue  # created by someone else meanwhile: look at it
                log.info("lease_acquired", lease=self.name, identity=self.identity)
                return
            spec = lease.get("spec") or {}
            holder = spec.get("holderIdentity")
            if holder and holder != self.identity:
                duration = float(spec.get("leaseDurationSeconds") or self.duration_s)
                renewed = _parse_time(spec.get("renewTime") or spec.get("acquireTime"))
                version = (lease.get("metadata") or {}).get("resourceVersion")
                key = (holder, spec.get("renewTime"), version)
                if observed is not None and key != observed:
                    raise LeaseHeld(
                        f"run is already driven by controller {holder} (Lease "
                        f"{self.namespace}/{self.name}, renewed {spec.get('renewTime')}); "
                        "refusing to start a second controller for the same run id"
                    )
                live_by_clock = renewed is None or (_now() - renewed).total_seconds() < duration
                if observed is None and live_by_clock:
                    # Live by its timestamp: observe it for one lease duration (our clock,
                    # not the holder's). A renewal means its holder is alive.
                    observed = key
                    watch_until = time.monotonic() + duration + 0.5
                    log.info(
                        "lease_held_waiting",
                        lease=self.name,
                        holder=holder,
                        seconds=round(duration, 1),
                    )
                if observed is not None and time.monotonic() < watch_until:
                    time.sleep(min(max(duration / 6, 0.1), watch_until - time.monotonic()))
                    continue
                log.warning("lease_expired_taking_over", lease=self.name, previous=holder)
            transitions = int(spec.get("leaseTransitions") or 0) + (1 if holder else 0)
            body = copy.deepcopy(lease)
            body.setdefault("metadata", {})["labels"] = {
                **((lease.get("metadata") or {}).get("labels") or {}),
                **self.labels,
            }
            body["spec"] = self._spec(transitions)
            try:
                self._lease = self.kube.replace_lease(self.namespace, self.name, body)
            except Conflict:
                observed = None  # someone else wrote it first: look again
                continue
            log.info(
                "lease_acquired", lease=self.name, identity=self.identity, transitions=transitions
            )
            return

    def start(self, on_lost: Callable[[], None]) -> None:
        """Renew every third of the lease duration in a daemon thread."""
        self._on_lost = on_lost
        self._thread = threading.Thread(target=self._renew_loop, name="lease-renewer", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        from skinlesion.kube import ApiError, Conflict

        log = logs.get()
        interval = self.duration_s / 3
        last_ok = time.monotonic()
        while not self._stop.wait(interval):
            try:
                self._renew_once()
                last_ok = time.monotonic()
            except Conflict as exc:
                log.error("lease_lost", lease=self.name, error=str(exc))
                break
            except ApiError as exc:
                log.warning("lease_renew_failed", lease=self.name, error=str(exc))
                if time.monotonic() - last_ok < self.duration_s - interval:
                    continue
                log.error("lease_lost", lease=self.name, error="not renewed within its duration")
                break
        else:
            return
        self.lost.set()
        self._on_lost()

    def _renew_once(self) -> None:
        from skinlesion.kube import Conflict

        assert self._lease is not None
        body = copy.deepcopy(self._lease)
        body["spec"]["renewTime"] = _micro(_now())
        try:
            self._lease = self.kube.replace_lease(self.namespace, self.name, body)
        except Conflict:
            # A retried write may have landed already: still ours if the holder is us.
            current = self.kube.get_lease(self.namespace, self.name)
            if (
                current is None
                or (current.get("spec") or {}).get("holderIdentity") != self.identity
            ):
                raise
            self._lease = current
            self._renew_once()

    def release(self) -> None:
        """Stop renewing and clear the holder (CAS), so the next controller need not wait."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10)
        if self._lease is None or self.lost.is_set():
            return
        from skinlesion.kube import ApiError

        body = copy.deepcopy(self._lease)
        body["spec"].pop("holderIdentity", None)
        body["spec"]["renewTime"] = _micro(_now())
        try:
            self.kube.replace_lease(self.namespace, self.name, body)
            logs.get().info("lease_released", lease=self.name)
        except ApiError as exc:
            logs.get().warning("lease_release_failed", lease=self.name, error=str(exc))
        self._lease = None


# --- Job outcomes -------------------------------------------------------------------------


def _conditions(obj: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [c for c in (obj.get("status") or {}).get("conditions") or [] if isinstance(c, dict)]


def job_state(job: Mapping[str, Any]) -> str | None:
    """ "Complete", "Failed", or None while the Job runs (terminal conditions only)."""
    for cond in _conditions(job):
        if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
            return str(cond["type"])
    return None


def _failed_condition(job: Mapping[str, Any]) -> dict[str, Any]:
    for cond in _conditions(job):
        if cond.get("type") == "Failed" and cond.get("status") == "True":
            return cond
    return {}


def _terminated(pod: Mapping[str, Any]) -> dict[str, Any]:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == CONTAINER:
            state = status.get("state") or {}
            last = status.get("lastState") or {}
            return dict(state.get("terminated") or last.get("terminated") or {})
    return {}


def _disrupted(pod: Mapping[str, Any]) -> bool:
    return any(
        c.get("type") == "DisruptionTarget" and c.get("status") == "True" for c in _conditions(pod)
    )


def _last_failed_pod(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"] or pods

    def when(pod: dict[str, Any]) -> str:
        return str(
            _terminated(pod).get("finishedAt")
            or (pod.get("metadata") or {}).get("creationTimestamp")
            or ""
        )

    return max(failed, key=when) if failed else None


_EXIT_CODE_IN_MESSAGE = re.compile(r"failed with exit code (\d+)")


# --- the executor -------------------------------------------------------------------------


class KubernetesExecutor:
    """pipeline.Executor that runs each stage call as one Kubernetes Job and watches it."""

    def __init__(
        self,
        kube: Kube,
        stages: StagesFile,
        namespace: str,
        release: str,
        lease: RunLease | None = None,
        max_wait_s: float = 0.0,
        watch_timeout_s: float = WATCH_TIMEOUT_S,
    ) -> None:
        self.kube = kube
        self.stages = stages
        self.namespace = namespace
        self.release = release
        self.lease = lease
        self.max_wait_s = max_wait_s
        self.watch_timeout_s = watch_timeout_s
        self.current: str | None = None  # the Job this controller is waiting for
        self._used: dict[str, int] = {}  # stage -> Job attempts used before this run's first
        self._watch: JobWatch | None = None

    # building

    def labels(self, stage: str, run_id: str, attempt: int) -> dict[str, str]:
        return {
            LABEL_INSTANCE: self.release,
            LABEL_STAGE: stage,
            LABEL_RUN_ID: run_id,
            LABEL_ATTEMPT: str(attempt),
        }

    def build_job(self, call: StageCall, run_id: str, attempt: int) -> dict[str, Any]:
        """The stage's Job shape (deep-copied), named, labelled, with the stage's args."""
        stage = call.stage.name
        shape = self.stages.jobs.get(stage)
        if shape is None:
            raise ConfigError("stages", f"the stages file has no Job shape for stage '{stage}'")
        job = copy.deepcopy(shape)
        job.setdefault("apiVersion", "batch/v1")
        job.setdefault("kind", "Job")
        labels = self.labels(stage, run_id, attempt)
        meta = job.setdefault("metadata", {})
        meta.pop("generateName", None)
        meta["name"] = job_name(self.release, stage, run_id, attempt)
        meta["namespace"] = self.namespace
        meta["labels"] = {**(meta.get("labels") or {}), **labels}
        template = job["spec"]["template"]
        tmeta = template.setdefault("metadata", {})
        tmeta["labels"] = {**(tmeta.get("labels") or {}), **labels}
        for container in template["spec"]["containers"]:
            if container.get("name") == CONTAINER:
                # argv[0] is the subcommand, which jobs/<job>.py prepends itself.
                container["args"] = [*call.argv[1:], "--run-id", run_id]
        return job

    # running

    def _resume(self, stage: str, run_id: str) -> tuple[int, dict[str, Any] | None]:
        """Where this stage starts: (attempts already used, a running Job to adopt or None).

        A running Job of the stage (a controller restarted mid-stage) is adopted. Jobs
        that had already ended before this controller started are history: their
        failures were handled by the controller that saw them, and they may be for other
        inputs; the next attempt gets the next free number instead of their result.
        """
        selector = ",".join(
            f"{k}={v}"
            for k, v in (
                (LABEL_INSTANCE, self.release),
                (LABEL_RUN_ID, run_id),
                (LABEL_STAGE, stage),
            )
        )
        items, _ = self.kube.list_jobs(self.namespace, label_selector=selector)

        def number(job: Mapping[str, Any]) -> int:
            value = ((job.get("metadata") or {}).get("labels") or {}).get(LABEL_ATTEMPT, "0")
            return int(value) if str(value).isdigit() else 0

        running = [j for j in items if job_state(j) is None]
        if running:
            job = max(running, key=number)
            return number(job) - 1, job
        return max((number(j) for j in items), default=0), None

    def run(self, call: StageCall, run_id: str, attempt: int) -> Outcome:
        from skinlesion.kube import Conflict

        log = logs.get()
        stage = call.stage.name
        adopted: dict[str, Any] | None = None
        if attempt == 1 or stage not in self._used:
            self._used[stage], adopted = self._resume(stage, run_id)
        number = attempt + self._used[stage]  # the Job's attempt, over controller restarts
        name = job_name(self.release, stage, run_id, number)
        self.current = name
        try:
            if adopted is not None:
                job = adopted
                log.info("adopting", step=stage, job=name, attempt=number)
            else:
                try:
                    job = self.kube.create_job(self.namespace, self.build_job(call, run_id, number))
                    log.info("job_created", step=stage, job=name, attempt=number)
                except Conflict:  # created meanwhile (not by a controller holding the Lease)
                    found = self.kube.get_job(self.namespace, name)
                    if found is None:
                        raise
                    job = found
                    log.info("adopting", step=stage, job=name, attempt=number)
            self._check_ours(job, stage, run_id, number)
            finished = self._wait(name, job)
        except _WaitTimeout:
            self._delete(name, "max_wait")
            return Outcome(
                "failed", None, "", f"Job {name}: no result within {self.max_wait_s:g} s"
            )
        except (Terminated, KeyboardInterrupt):
            self._delete(name, "terminated")
            raise
        finally:
            self.current = None
        if finished is None:
            return Outcome("failed", None, "", f"Job {name} was deleted before it finished")
        if job_state(finished) == "Complete":
            log.info("job_complete", step=stage, job=name)
            return Outcome("succeeded", 0)
        return self._failure(stage, finished)

    def _check_ours(self, job: Mapping[str, Any], stage: str, run_id: str, attempt: int) -> None:
        labels = (job.get("metadata") or {}).get("labels") or {}
        want = self.labels(stage, run_id, attempt)
        if any(labels.get(k) != v for k, v in want.items()):
            name = (job.get("metadata") or {}).get("name")
            raise SkinlesionError(
                f"Job {self.namespace}/{name} exists but is not stage '{stage}' attempt "
                f"{attempt} of run '{run_id}' (labels {labels}); delete it or use another run id"
            )

    def _wait(self, name: str, job: dict[str, Any]) -> dict[str, Any] | None:
        """Watch the Job until it ends: the final Job, or None when it was deleted."""
        deadline = time.monotonic() + self.max_wait_s if self.max_wait_s > 0 else None
        rv: str | None = (job.get("metadata") or {}).get("resourceVersion")
        selector = f"metadata.name={name}"
        from skinlesion.kube import Gone

        while True:
            if job_state(job) is not None:
                return job
            self._check_lease()
            left = self.watch_timeout_s
            if deadline is not None:
                left = min(left, deadline - time.monotonic())
                if left <= 0:
                    raise _WaitTimeout()
            if rv is None:  # (re)list: the current state and where to watch from
                items, rv = self.kube.list_jobs(self.namespace, field_selector=selector)
                found = [j for j in items if (j.get("metadata") or {}).get("name") == name]
                if not found:
                    return None
                job = found[0]
                if job_state(job) is not None:
                    return job
            started = time.monotonic()
            self._watch = self.kube.watch_jobs(
                self.namespace, field_selector=selector, resource_version=rv, timeout_s=left
            )
            events = 0
            try:
                for kind, obj in self._watch:
                    events += 1
                    if (obj.get("metadata") or {}).get("name") != name:
                        continue
                    if kind == "DELETED":
                        return None
                    job = obj
                    if job_state(job) is not None:
                        return job
                    self._check_lease()
                rv = self._watch.resource_version
            except Gone:
                rv = None  # compacted away: list again, at once
                continue
            finally:
                self._watch = None
            self._check_lease()
            if events == 0 and time.monotonic() - started < 1.0:
                time.sleep(0.5)  # a stream that ends at once: do not hammer the server

    def _check_lease(self) -> None:
        if self.lease is not None and self.lease.lost.is_set():
            raise LeaseLost(
                f"lost Lease {self.lease.namespace}/{self.lease.name}: another controller may "
                "drive this run now; stopping without touching its Jobs"
            )

    def interrupt(self) -> None:
        """Wake the waiting thread (from the lease renewer) so that it sees `lease.lost`."""
        watch_ = self._watch
        if watch_ is not None:
            watch_.stop()

    def _delete(self, name: str, why: str) -> None:
        try:
            deleted = self.kube.delete_job(self.namespace, name)
            logs.get().warning(
                "job_deleted", job=name, reason=why, existed=deleted, propagation="Background"
            )
        except SkinlesionError as exc:
            logs.get().error("job_delete_failed", job=name, reason=why, error=str(exc))

    def _failure(self, stage: str, job: Mapping[str, Any]) -> Outcome:
        """A Failed Job as an Outcome: exit code and log tail of its last failed pod."""
        from skinlesion.kube import ApiError

        log = logs.get()
        name = str((job.get("metadata") or {}).get("name"))
        cond = _failed_condition(job)
        reason = str(cond.get("reason") or "Failed")
        message = str(cond.get("message") or "")
        pods: list[dict[str, Any]] = []
        for label in JOB_NAME_LABELS:
            pods = self.kube.list_pods(self.namespace, f"{label}={name}")
            if pods:
                break
        pod = _last_failed_pod(pods)
        exit_code: int | None = None
        tail = ""
        disrupted = False
        if pod is not None:
            pod_name = str((pod.get("metadata") or {}).get("name"))
            code = _terminated(pod).get("exitCode")
            exit_code = int(code) if code is not None else None
            disrupted = _disrupted(pod)
            try:
                tail = self.kube.pod_log(self.namespace, pod_name, CONTAINER, LOG_TAIL_LINES)
            except ApiError as exc:
                tail = f"(log of pod {pod_name} unavailable: {exc})"
        else:
            tail = f"(no pod of Job {name} left to read a log from)"
        if exit_code is None and (m := _EXIT_CODE_IN_MESSAGE.search(message)):
            exit_code = int(m.group(1))
        detail = f"Job {name} failed: {reason}" + (f" ({message})" if message else "")
        if exit_code is not None:
            detail += f", exit code {exit_code}"
        preempted = reason != "DeadlineExceeded" and (disrupted or "DisruptionTarget" in message)
        log.warning(
            "job_failed",
            step=stage,
            job=name,
            reason=reason,
            exit_code=exit_code,
            preempted=preempted,
            log_tail="\n".join(tail.splitlines()[-LOG_LINES_IN_LOG:]),
        )
        return Outcome("preempted" if preempted else "failed", exit_code, tail, detail)


# --- the command --------------------------------------------------------------------------


def _resolve_run_id(args: argparse.Namespace, release: str) -> str:
    if getattr(args, "run_id_from_job", False):
        name = os.environ.get(JOB_NAME_ENV)
        if not name:
            raise InputError(f"--run-id-from-job needs ${JOB_NAME_ENV} (the controller's Job name)")
        return run_id_from_job_name(name, release)
    return safe_run_id(args.run_id)


def run_controller(
    cfg: config.PipelineConfig, args: argparse.Namespace, kube: Kube | None = None
) -> int:
    """Run every stage not yet done as a Job, in order; 0, or raise naming the stage.

    `kube` is for tests (a client pointed at an emulator); otherwise the client is
    configured from --kubeconfig / --in-cluster.
    """
    log = logs.get()
    stages = load_stages(args.stages)
    release = args.release or stages.release
    if not release:
        raise ConfigError("release", "give --release or 'release' in the stages file")
    run_id = _resolve_run_id(args, release)
    logs.bind(run_id=run_id, stage="controller")
    store = args.store or stages.store
    if not store:
        raise ConfigError("store", "give --store or 'store' in the stages file")
    layout = RunLayout(store, run_id)
    missing = [c.stage.name for c in plan(cfg, layout, args.raw) if c.stage.name not in stages.jobs]
    if missing:
        raise ConfigError(
            "stages", f"{args.stages}: no Job shape for stage(s) {', '.join(missing)}"
        )

    if kube is None:
        from skinlesion import kube as kube_module

        kube = kube_module.Kube.connect(args.kubeconfig, args.in_cluster)
        namespace = args.namespace or stages.namespace or kube_module.default_namespace()
    else:
        namespace = args.namespace or stages.namespace
    if not namespace:
        raise ConfigError("namespace", "give --namespace or 'namespace' in the stages file")

    log.info(
        "controller_start",
        release=release,
        namespace=namespace,
        store=layout.store,
        stages=[s.name for s in STAGES if s.name in stages.jobs],
    )
    lease = RunLease(
        kube,
        namespace,
        f"{release}-{run_id}",
        args.lease_seconds,
        {LABEL_INSTANCE: release, LABEL_STAGE: "controller", LABEL_RUN_ID: run_id},
    )
    lease.acquire()
    executor = KubernetesExecutor(
        kube, stages, namespace, release, lease=lease, max_wait_s=args.max_wait_s
    )
    lease.start(on_lost=executor.interrupt)
    try:
        report = run_pipeline(cfg, layout, executor, raw_uri=args.raw, retry_delay_s=RETRY_DELAY_S)
    finally:
        lease.release()
    log.info(
        "controller_done",
        run=layout.run_uri,
        stages={s.stage: s.status for s in report.stages},
        attempts=sum(s.attempts for s in report.stages),
    )
    return 0
