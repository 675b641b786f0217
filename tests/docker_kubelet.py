"""An executing kubelet for the tests: every Job in the API emulator runs as containers.

`DockerKubelet` watches the emulator's Jobs (tests/kmock_server.py) and for each new one
plays the two parts of a cluster that run it:

- the Job controller: one pod at a time (completions 1, restartPolicy Never); the pod's
  end is judged by the Job's `podFailurePolicy` (rules in order, `onExitCodes` /
  `onPodConditions`, actions FailJob, Ignore, Count) and `backoffLimit`, and written into
  the Job's status the way Kubernetes 1.31+ writes it (`FailureTarget` + `Failed` with
  reason PodFailurePolicy / BackoffLimitExceeded / DeadlineExceeded and the API's own
  messages; `SuccessCriteriaMet` + `Complete`); `activeDeadlineSeconds` from the Job's
  start; a deleted Job's pods are stopped and deleted (background propagation);
- the kubelet: the pod's container with `docker run --network host` on the image the spec
  names (tests/docker_pod.py builds the command line: command/args, env with
  secretKeyRef / configMapKeyRef / fieldRef, the security context, emptyDir, ConfigMap and
  Secret volumes, the ServiceAccount token, memory and CPU limits); the container's
  exit code, its terminated state (reason `OOMKilled` from `docker inspect`) and its log
  go into the pod's status and the emulator's pod logs.

`lose_node(pod)` is a node lost under a running pod: the container is SIGKILLed and the pod
ends as the control plane reports it (phase Failed, condition DisruptionTarget, container
state ContainerStatusUnknown, exit code 137).

Every Job is first checked against the Kubernetes schema (kubernetes-validate, strict), as
the API server would on create. Differences from a cluster, on purpose: failed pods are
retried after `backoff_s` (1 s), not Kubernetes' 10 s doubling; finished Jobs are kept (no
TTL controller); a pod lost with its node stays listed as Failed (the pod garbage collector
would delete it); emptyDir volumes are tmpfs mounts of their size limit, so they count
against the container's memory limit (as `medium: Memory` does). A pod field this kubelet
cannot honour is an error (see docker_pod.PodConfigError), recorded and re-raised by
`__exit__`, and its Job is failed so that no controller hangs on it; nothing is silently
ignored.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client, watch

from tests import chart_render as cr
from tests import docker_engine
from tests.cluster_auth import ClusterAuth
from tests.docker_pod import PodConfigError, PodSources, container_command
from tests.kmock_server import KMock

SESSION_LABEL = "skinlesion.test.kubelet"
BACKOFF_MESSAGE = "Job has reached the specified backoff limit"
DEADLINE_MESSAGE = "Job was active longer than specified deadline"


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class PodRecord:
    """One pod this kubelet ran, as the test sees it afterwards."""

    name: str
    job: str
    container: str = ""  # docker container name
    exit_code: int | None = None
    reason: str = ""  # Completed, Error, OOMKilled, ContainerStatusUnknown, ...
    memory_limit: str | None = None
    lost: bool = False  # its node was lost (lose_node)
    log: str = ""
    docker_args: list[str] = field(default_factory=list)


class _JobRun:
    """The Job controller's loop for one Job, in its own thread."""

    def __init__(self, kubelet: DockerKubelet, job: dict[str, Any]) -> None:
        self.kubelet = kubelet
        self.job = job
        self.name: str = job["metadata"]["name"]
        self.deleted = threading.Event()
        self.current: PodRecord | None = None
        self.thread = threading.Thread(target=self.run, name=f"job-{self.name}", daemon=True)

    # the Job controller

    def run(self) -> None:
        k = self.kubelet
        api = client.ApiClient(k.km.configuration())
        self.batch, self.core = client.BatchV1Api(api), client.CoreV1Api(api)
        spec = self.job["spec"]
        started = time.monotonic()
        deadline = spec.get("activeDeadlineSeconds")
        self.deadline_at = started + float(deadline) if deadline else None
        backoff_limit = int(spec.get("backoffLimit", 6))
        failed = 0
        status: dict[str, Any] = {"startTime": now(), "active": 0, "failed": 0, "succeeded": 0}
        try:
            # what the API server would have refused (kmock stores any body): strict schema
            cr.validate({k: v for k, v in self.job.items() if k != "status"}, cr.KUBE_VERSIONS[-1])
            while not self.deleted.is_set():
                if self.deadline_at is not None and time.monotonic() >= self.deadline_at:
                    self.finish(status, "Failed", "DeadlineExceeded", DEADLINE_MESSAGE)
                    return
                pod = self.create_pod()
                self.status(status, active=1)
                record = self.kubelet.run_pod(self, pod)
                if self.deleted.is_set():
                    return
                if record.reason == "DeadlineExceeded":
                    self.status(status, active=0)
                    self.finish(status, "Failed", "DeadlineExceeded", DEADLINE_MESSAGE)
                    return
                if record.exit_code == 0:
                    self.status(status, active=0, succeeded=1)
                    self.finish(status, "Complete", None, None)
                    return
                action, message = pod_failure_action(spec, pod, record)
                if action == "FailJob":
                    self.status(status, active=0, failed=failed + 1)
                    self.finish(status, "Failed", "PodFailurePolicy", message)
                    return
                if action == "Ignore":
                    self.status(status, active=0)
                    continue  # not counted: a replacement pod at once
                failed += 1
                self.status(status, active=0, failed=failed)
                if failed > backoff_limit:
                    self.finish(status, "Failed", "BackoffLimitExceeded", BACKOFF_MESSAGE)
                    return
                time.sleep(k.backoff_s)
        except Exception as exc:  # the kubelet's own failure: record it, fail the Job
            k.broke(self, exc)

    def create_pod(self) -> dict[str, Any]:
        template = self.job["spec"]["template"]
        name = f"{self.name[:57]}-{secrets.token_hex(3)[:5]}"
        labels = {
            **(template.get("metadata") or {}).get("labels", {}),
            "controller-uid": self.uid,
            "batch.kubernetes.io/controller-uid": self.uid,
            "job-name": self.name,
            "batch.kubernetes.io/job-name": self.name,
        }
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": self.kubelet.namespace,
                "uid": str(uuid.uuid4()),
                "labels": labels,
                "annotations": (template.get("metadata") or {}).get("annotations", {}),
                "creationTimestamp": now(),
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": self.name,
                        "uid": self.uid,
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": {**template["spec"], "nodeName": self.kubelet.node_name},
            "status": {"phase": "Pending", "conditions": []},
        }
        # As is: the client's models refuse int quantities the API server accepts.
        create = client.CoreV1Api.create_namespaced_pod.raw_function  # type: ignore[attr-defined]
        create(self.core, self.kubelet.namespace, pod, _preload_content=False)
        return pod

    @property
    def uid(self) -> str:
        meta = self.job["metadata"]
        if not meta.get("uid"):
            meta["uid"] = str(uuid.uuid4())
        return str(meta["uid"])

    def status(self, status: dict[str, Any], **changes: int) -> None:
        status.update(changes)
        self.patch({"status": status})

    def finish(
        self, status: dict[str, Any], kind: str, reason: str | None, message: str | None
    ) -> None:
        first = "SuccessCriteriaMet" if kind == "Complete" else "FailureTarget"
        detail = {"reason": reason, "message": message} if reason else {}
        conditions = [
            {"type": t, "status": "True", "lastTransitionTime": now(), **detail}
            for t in (first, kind)
        ]
        if kind == "Complete":
            status["completionTime"] = now()
        self.status(status)
        self.patch({"status": {**status, "conditions": conditions}})
        self.kubelet.notify()

    def patch(self, body: dict[str, Any]) -> None:
        if self.deleted.is_set():
            return
        with contextlib.suppress(client.ApiException):  # deleted meanwhile
            self.batch.patch_namespaced_job_status(
                self.name, self.kubelet.namespace, body, _preload_content=False
            )


def pod_failure_action(
    job_spec: dict[str, Any], pod: dict[str, Any], record: PodRecord
) -> tuple[str, str]:
    """The podFailurePolicy action for a failed pod ("Count" when no rule matches) and the
    message the Job's condition gets, as the Job controller words it."""
    policy = job_spec.get("podFailurePolicy") or {}
    conditions = (pod.get("status") or {}).get("conditions") or []
    container = pod["spec"]["containers"][0]["name"]
    ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
    for index, rule in enumerate(policy.get("rules") or []):
        action = str(rule["action"])
        codes = rule.get("onExitCodes")
        if codes is not None:
            if codes.get("containerName") not in (None, container) or record.exit_code is None:
                continue
            inside = record.exit_code in codes["values"]
            if codes["operator"] == "NotIn":
                inside = record.exit_code != 0 and not inside
            if inside:
                return action, (
                    f"Container {container} for pod {ns}/{name} failed with exit code "
                    f"{record.exit_code} matching {action} rule at index {index}"
                )
            continue
        for wanted in rule.get("onPodConditions") or []:
            if any(
                c.get("type") == wanted["type"] and c.get("status") == wanted.get("status", "True")
                for c in conditions
            ):
                return action, (
                    f"Pod {ns}/{name} has condition {wanted['type']} matching {action} rule "
                    f"at index {index}"
                )
    return "Count", ""


class DockerKubelet:
    """Runs the emulator's Jobs as containers (see the module docstring)."""

    def __init__(
        self,
        km: KMock,
        auth: ClusterAuth,
        namespace: str,
        workdir: Path,
        backoff_s: float = 1.0,
        node_name: str = "kind-worker",
    ) -> None:
        self.km = km
        self.auth = auth
        self.namespace = namespace
        self.workdir = workdir
        self.backoff_s = backoff_s
        self.node_name = node_name
        self.session = uuid.uuid4().hex[:12]
        self.runs: dict[str, _JobRun] = {}
        self.pods: list[PodRecord] = []
        self.errors: list[BaseException] = []
        self._changed = threading.Condition()
        self._stopped = False
        self._watch = watch.Watch()
        self._thread = threading.Thread(target=self._run, name="docker-kubelet", daemon=True)
        self.api = client.ApiClient(km.configuration())
        self.batch = client.BatchV1Api(self.api)

    # lifecycle

    def __enter__(self) -> DockerKubelet:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop watching; kill what still runs (no grace: the test is over), then remove
        every container of this kubelet."""
        self._stopped = True
        self._watch.stop()
        for run in list(self.runs.values()):
            run.deleted.set()
        mine = f"label={SESSION_LABEL}={self.session}"
        running = docker_engine.docker("ps", "-q", "--filter", mine, check=False).stdout.split()
        if running:
            docker_engine.docker("kill", *running, check=False)
        for run in list(self.runs.values()):
            run.thread.join(30)
        self._thread.join(10)
        ours = docker_engine.docker("ps", "-aq", "--filter", mine, check=False).stdout.split()
        if ours:
            docker_engine.docker("rm", "-f", *ours, check=False)
        if self.errors and not any(exc):
            raise self.errors[0]

    def notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Block until `predicate()` holds (re-checked when a pod or Job changes, and every s)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate():
                if self.errors:
                    raise self.errors[0]
                left = deadline - time.monotonic()
                if left <= 0:
                    pods = ", ".join(f"{p.name}:{p.reason or 'running'}" for p in self.pods)
                    raise TimeoutError(f"{what}: not within {timeout:.0f} s (pods: {pods})")
                self._changed.wait(min(left, 1.0))

    def broke(self, run: _JobRun, exc: BaseException) -> None:
        """The kubelet could not run a pod as specified: recorded, and the Job failed."""
        self.errors.append(exc)
        with contextlib.suppress(Exception):
            run.finish({"active": 0, "failed": 1}, "Failed", "TestKubeletError", str(exc)[:500])
        self.notify()

    # the watch on Jobs

    def _run(self) -> None:
        while not self._stopped:
            try:
                for event in self._watch.stream(
                    self.batch.list_namespaced_job,
                    self.namespace,
                    _request_timeout=(5, 300),
                    deserialize=False,
                ):
                    self._event(event["type"], event["object"])
            except (urllib3.exceptions.HTTPError, OSError):
                if not self._stopped:
                    time.sleep(0.1)

    def _event(self, kind: str, job: dict[str, Any]) -> None:
        name = job["metadata"]["name"]
        if kind == "DELETED":
            run = self.runs.get(name)
            if run is not None and not run.deleted.is_set():
                run.deleted.set()
                threading.Thread(target=self._delete_pods, args=(run,), daemon=True).start()
            return
        if kind != "ADDED" or name in self.runs or (job.get("status") or {}).get("conditions"):
            return  # known, or finished before this kubelet started (a watch replays it)
        run = _JobRun(self, job)
        self.runs[name] = run
        run.thread.start()
        self.notify()

    def _delete_pods(self, run: _JobRun) -> None:
        """A deleted Job: its running pod is stopped with its grace period, then its pods
        are deleted (propagation Background)."""
        record = run.current
        if record is not None and record.container:
            grace = int(
                run.job["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
            )
            docker_engine.docker("stop", "-t", str(grace), record.container, check=False)
        core = client.CoreV1Api(client.ApiClient(self.km.configuration()))
        for pod in self.km.objects("v1/pods"):
            if pod["metadata"].get("labels", {}).get("job-name") == run.name:
                with contextlib.suppress(client.ApiException):
                    core.delete_namespaced_pod(
                        pod["metadata"]["name"], self.namespace, _preload_content=False
                    )
        self.notify()

    # the kubelet: one pod's container

    def run_pod(self, run: _JobRun, pod: dict[str, Any]) -> PodRecord:
        meta = pod["metadata"]
        record = PodRecord(name=meta["name"], job=run.name)
        run.current = record
        self.pods.append(record)
        sources = PodSources(
            secrets=self._by_name("v1/secrets"),
            config_maps=self._by_name("v1/configmaps"),
            service_accounts=self._by_name("v1/serviceaccounts"),
            images=self._local_image,
            token_for=self.auth.token_for,
            ca_cert=self.auth.ca_cert.read_text(),
            api_port=self.auth.port,
        )
        try:
            command = container_command(pod, sources, self.workdir / meta["name"], self.session)
        except PodConfigError as exc:
            raise PodConfigError(f"pod {meta['name']} of Job {run.name}: {exc}") from None
        record.container = command.container
        record.memory_limit = command.memory_limit
        record.docker_args = command.argv
        started = now()
        docker_engine.docker(*command.argv, env=command.env)
        self._pod_status(
            run,
            pod,
            "Running",
            {"running": {"startedAt": started}},
            ready=True,
        )
        self.notify()
        waiter = subprocess.Popen(
            [docker_engine.client(), "wait", command.container],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        grace = int(pod["spec"].get("terminationGracePeriodSeconds", 30))
        deadline_hit = False
        while waiter.poll() is None:
            if run.deleted.is_set() and not self._stopped:
                docker_engine.docker("stop", "-t", str(grace), command.container, check=False)
            elif run.deadline_at is not None and time.monotonic() >= run.deadline_at:
                deadline_hit = True
                docker_engine.docker("stop", "-t", str(grace), command.container, check=False)
            with contextlib.suppress(subprocess.TimeoutExpired):
                waiter.wait(0.5)
        state = self._inspect(command.container)
        record.log = self.logs(command.container)
        self.km.pod_logs[(self.namespace, meta["name"])] = record.log
        (self.workdir / meta["name"] / "log.txt").write_text(record.log)  # for a failed test
        record.exit_code = int(state["ExitCode"])
        terminated: dict[str, Any] = {
            "exitCode": record.exit_code,
            "startedAt": state.get("StartedAt", started)[:19] + "Z",
            "finishedAt": state.get("FinishedAt", now())[:19] + "Z",
            "containerID": f"docker://{state['Id']}",
        }
        conditions: list[dict[str, Any]] = []
        if record.lost:  # how the control plane reports a pod whose node is gone
            record.exit_code, record.reason = 137, "ContainerStatusUnknown"
            terminated.update(
                exitCode=137,
                reason="ContainerStatusUnknown",
                message="The container could not be located when the pod was terminated",
            )
            conditions.append(
                {
                    "type": "DisruptionTarget",
                    "status": "True",
                    "reason": "DeletionByTaintManager",
                    "message": "Taint manager: deleting due to NoExecute taint",
                    "lastTransitionTime": now(),
                }
            )
        else:
            record.reason = (
                "OOMKilled"
                if state.get("OOMKilled")
                else ("Completed" if record.exit_code == 0 else "Error")
            )
            terminated["reason"] = record.reason
        phase = "Succeeded" if record.exit_code == 0 else "Failed"
        if not run.deleted.is_set():
            self._pod_status(run, pod, phase, {"terminated": terminated}, conditions=conditions)
        if deadline_hit:
            record.reason = "DeadlineExceeded"
        run.current = None
        self.notify()
        return record

    def _pod_status(
        self,
        run: _JobRun,
        pod: dict[str, Any],
        phase: str,
        state: dict[str, Any],
        ready: bool = False,
        conditions: list[dict[str, Any]] | None = None,
    ) -> None:
        container = pod["spec"]["containers"][0]
        status = {
            "phase": phase,
            "hostIP": "127.0.0.1",
            "podIP": "127.0.0.1",
            "startTime": pod["metadata"]["creationTimestamp"],
            "conditions": [
                *(conditions or []),
                {"type": "Ready", "status": "True" if ready else "False"},
            ],
            "containerStatuses": [
                {
                    "name": container["name"],
                    "image": container["image"],
                    "imageID": "",
                    "ready": ready,
                    "restartCount": 0,
                    "started": ready,
                    "state": state,
                }
            ],
        }
        pod["status"] = status
        with contextlib.suppress(client.ApiException):
            run.core.patch_namespaced_pod_status(
                pod["metadata"]["name"], self.namespace, {"status": status}, _preload_content=False
            )

    # what the tests do to running pods

    def lose_node(self, pod_name: str) -> None:
        """The node under a running pod is lost: its container is killed at once."""
        record = next(p for p in self.pods if p.name == pod_name)
        if record.exit_code is not None:
            raise AssertionError(f"pod {pod_name} had already ended ({record.reason})")
        record.lost = True
        docker_engine.docker("kill", "--signal", "KILL", record.container)

    def running(self, job_prefix: str) -> PodRecord | None:
        """The running pod of the Job whose name starts with `job_prefix`, if any."""
        for record in self.pods:
            if record.job.startswith(job_prefix) and record.exit_code is None:
                return record
        return None

    def logs(self, container: str) -> str:
        """The container's stdout and stderr, merged in time order (as `kubectl logs`)."""
        done = docker_engine.docker("logs", "--timestamps", container, check=False)
        stamped = []
        for line in (done.stdout + done.stderr).splitlines():
            stamp, _, text = line.partition(" ")
            stamped.append((_sortable(stamp), text))
        return "".join(text + "\n" for _, text in sorted(stamped, key=lambda s: s[0]))

    # lookups

    def _by_name(self, resource: str) -> dict[str, dict[str, Any]]:
        return {
            o["metadata"]["name"]: o
            for o in self.km.objects(resource)
            if o["metadata"].get("namespace", self.namespace) == self.namespace
        }

    @staticmethod
    def _local_image(name: str) -> bool:
        return docker_engine.docker("image", "inspect", name, check=False).returncode == 0

    @staticmethod
    def _inspect(container: str) -> dict[str, Any]:
        fmt = (
            '{"Id":"{{.Id}}","ExitCode":{{.State.ExitCode}},"OOMKilled":{{.State.OOMKilled}},'
            '"StartedAt":"{{.State.StartedAt}}","FinishedAt":"{{.State.FinishedAt}}"}'
        )
        data: dict[str, Any] = json.loads(
            docker_engine.docker("inspect", "--format", fmt, container).stdout
        )
        return data


def _sortable(stamp: str) -> str:
    """An RFC 3339 timestamp with its fraction padded to nanoseconds (Docker trims zeros)."""
    m = re.match(r"^(.*?)(?:\.(\d+))?Z$", stamp)
    return f"{m.group(1)}.{(m.group(2) or '').ljust(9, '0')}" if m else stamp
