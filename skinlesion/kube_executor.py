"""The Kubernetes executor: each stage call as one Job, created (or adopted) and watched.

- it waits by watching the Job (never by sleeping), and turns the Job's end into an
  `Outcome`: Complete -> succeeded; Failed -> failed with the failed pod's exit code
  and log tail, or preempted when the pod was disrupted (node loss, preemption);
- it is restart-safe: a stage Job still running (its controller was restarted) is
  adopted and watched, never created twice; Jobs that had already ended before are
  history, and the attempt numbers they used are reported to the run loop, which
  numbers the next attempt (`attempts_used`);
- SIGTERM (errors.Terminated) deletes the running Job (background propagation).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from skinlesion import logs
from skinlesion.errors import ConfigError, SkinlesionError, Terminated
from skinlesion.kube_jobs import (
    CONTAINER,
    JOB_NAME_LABELS,
    OomRetry,
    StagesFile,
    attempt_of,
    build_job,
    disrupted,
    exit_code_in_message,
    failed_condition,
    format_quantity,
    job_name,
    job_state,
    labels,
    last_failed_pod,
    memory_limit,
    raised_memory_limit,
    stage_selector,
    terminated,
)
from skinlesion.lease import LeaseLost, RunLease
from skinlesion.pipeline import Outcome, StageCall

if TYPE_CHECKING:
    from skinlesion.kube import JobWatch, Kube

LOG_TAIL_LINES = 100  # saved to the store (runs/<id>/logs/)
LOG_LINES_IN_LOG = 20  # of those, repeated in the controller's own log line
WATCH_TIMEOUT_S = 60.0  # one watch request; then it resumes from the last resourceVersion


class _WaitTimeout(Exception):
    """--max-wait-s passed without the Job ending."""


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
        self._adoptable: dict[str, dict[str, Any]] = {}  # stage -> its running Job
        self._memory: dict[str, int] = {}  # stage -> memory limit raised after an OOM kill
        self._watch: JobWatch | None = None

    # building

    def labels(self, stage: str, run_id: str, attempt: int) -> dict[str, str]:
        return labels(self.release, stage, run_id, attempt)

    def build_job(self, call: StageCall, run_id: str, attempt: int) -> dict[str, Any]:
        memory = self._memory.get(call.stage.name)
        return build_job(self.stages, call, self.namespace, self.release, run_id, attempt, memory)

    # running

    def attempts_used(self, call: StageCall, run_id: str) -> int:
        """The highest attempt number among the stage's Jobs (0: none).

        A running Job of the stage (a controller restarted mid-stage) is to be adopted:
        it counts as not used yet, and `run` watches it instead of creating a Job. Jobs
        that had already ended before this controller started are history: their
        failures were handled by the controller that saw them, and they may be for other
        inputs; the next attempt gets the next free number instead of their result.
        """
        stage = call.stage.name
        selector = stage_selector(self.release, stage, run_id)
        items, _ = self.kube.list_jobs(self.namespace, label_selector=selector)
        self._adoptable.pop(stage, None)
        running = [j for j in items if job_state(j) is None]
        if running:
            job = max(running, key=attempt_of)
            self._adoptable[stage] = job
            return attempt_of(job) - 1
        return max((attempt_of(j) for j in items), default=0)

    def run(self, call: StageCall, run_id: str, attempt: int) -> Outcome:
        from skinlesion.kube import Conflict

        log = logs.get()
        stage = call.stage.name
        adopted = self._adoptable.pop(stage, None)
        if adopted is not None and attempt_of(adopted) != attempt:
            adopted = None  # not this attempt's Job
        name = job_name(self.release, stage, run_id, attempt)
        self.current = name
        try:
            if adopted is not None:
                job = adopted
                log.info("adopting", step=stage, job=name, attempt=attempt)
            else:
                try:
                    job = self.kube.create_job(
                        self.namespace, self.build_job(call, run_id, attempt)
                    )
                    log.info("job_created", step=stage, job=name, attempt=attempt)
                except Conflict:  # created meanwhile (not by a controller holding the Lease)
                    found = self.kube.get_job(self.namespace, name)
                    if found is None:
                        raise
                    job = found
                    log.info("adopting", step=stage, job=name, attempt=attempt)
            self._check_ours(job, stage, run_id, attempt)
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

    def _oom_killed(self, stage: str, name: str, pod: Mapping[str, Any]) -> str:
        """Say in one line that the stage ran out of memory, and give its next attempt more
        (stages.<stage>.oomRetry). Returns the failure reason."""
        shape_limit = memory_limit(self.stages.jobs[stage]["spec"]["template"]["spec"])
        # The pod's own limit (what it was killed at); else what this controller gave it.
        try:
            limit = memory_limit(pod.get("spec") or {})
        except ConfigError:  # a pod without the stage container: use what we know
            limit = None
        limit = limit if limit is not None else self._memory.get(stage, shape_limit)
        reason = "OOMKilled" + (f" at memory limit {format_quantity(limit)}" if limit else "")
        if limit is None or shape_limit is None:
            logs.get().warning(
                "stage_oom_killed",
                step=stage,
                job=name,
                message=f"stage {stage} ran out of memory (OOMKilled, no memory limit set)",
            )
            return reason
        retry = self.stages.oom.get(stage, OomRetry())
        raised = raised_memory_limit(limit, retry, shape_limit)
        self._memory[stage] = raised
        more = (
            f"the next attempt gets {format_quantity(raised)}"
            if raised > limit
            else f"it is at the cap (stages.{stage}.oomRetry.maxMemory), as it stays"
        )
        logs.get().warning(
            "stage_oom_killed",
            step=stage,
            job=name,
            memory_limit=format_quantity(limit),
            next_memory_limit=format_quantity(raised),
            message=f"stage {stage} ran out of memory (OOMKilled at limit "
            f"{format_quantity(limit)}): {more}",
        )
        return reason

    def _failure(self, stage: str, job: Mapping[str, Any]) -> Outcome:
        """A Failed Job as an Outcome: exit code and log tail of its last failed pod."""
        from skinlesion.kube import ApiError

        log = logs.get()
        name = str((job.get("metadata") or {}).get("name"))
        cond = failed_condition(job)
        reason = str(cond.get("reason") or "Failed")
        message = str(cond.get("message") or "")
        pods: list[dict[str, Any]] = []
        for label in JOB_NAME_LABELS:
            pods = self.kube.list_pods(self.namespace, f"{label}={name}")
            if pods:
                break
        pod = last_failed_pod(pods)
        exit_code: int | None = None
        tail = ""
        was_disrupted = False
        if pod is not None:
            pod_name = str((pod.get("metadata") or {}).get("name"))
            code = terminated(pod).get("exitCode")
            exit_code = int(code) if code is not None else None
            was_disrupted = disrupted(pod)
            try:
                tail = self.kube.pod_log(self.namespace, pod_name, CONTAINER, LOG_TAIL_LINES)
            except ApiError as exc:
                tail = f"(log of pod {pod_name} unavailable: {exc})"
        else:
            tail = f"(no pod of Job {name} left to read a log from)"
        if exit_code is None:
            exit_code = exit_code_in_message(message)
        if pod is not None and terminated(pod).get("reason") == "OOMKilled":
            reason = self._oom_killed(stage, name, pod)
        detail = f"Job {name} failed: {reason}" + (f" ({message})" if message else "")
        if exit_code is not None:
            detail += f", exit code {exit_code}"
        preempted = reason != "DeadlineExceeded" and (
            was_disrupted or "DisruptionTarget" in message
        )
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
