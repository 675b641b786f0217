"""kmock served over HTTP to the official `kubernetes` client, plus a fake kubelet.

`KMock` runs `kmock.KubernetesEmulator` and `kmock.Server` in a private event loop
on a daemon thread (both built inside that loop: they hold asyncio primitives) and adds, as
reactions here in the test fixture, what kmock lacks and a real API server has:

- label and field selectors on list and watch (kmock ignores both);
- PUT (replace), with `metadata.resourceVersion` compare-and-swap (409 on a stale
  write) for any kind; created Leases get a resourceVersion so the CAS has
  something to compare (the controller writes Leases with create + replace only);
- on request (`expire_watches`), a watch from a resourceVersion answered with the
  410 Expired ERROR event a real server sends once that version is compacted;
- `pods/<name>/log` answered as text/plain from `KMock.pod_logs` (honours tailLines);
- the resources the controller lists declared, so empty lists answer 200, not 404;
- a short server shutdown timeout, so a watch left open does not stall teardown;
- on request (`serve_https`), an HTTPS endpoint for pods (the in-cluster client speaks only
  TLS) whose requests are authenticated by ServiceAccount token and authorized by the
  namespace's Roles and RoleBindings, as a real API server does (`authorize`,
  tests/cluster_auth.py); requests on the plain port (the test harness) are not checked.

`FakeKubelet` stands in for the Job controller and kubelet: it watches the Jobs the
controller creates and, per a script, "runs" each one — commits the stage's manifest
with the fingerprint the pipeline expects (instead of running the real stage) and
marks the Job Complete, or fails it with a pod whose container exited 1 or 2, or
preempts it with a pod carrying the DisruptionTarget condition, or leaves it running.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import json
import secrets
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import attrs
import kmock
import urllib3
from kubernetes import client, watch

from skinlesion import config
from skinlesion.kube_jobs import LABEL_RUN_ID
from skinlesion.layout import RunLayout
from skinlesion.manifest import commit_stage, input_fingerprints
from skinlesion.pipeline import StageCall, plan
from skinlesion.storage import open_store

SHUTDOWN_TIMEOUT_S = 0.5  # aiohttp waits 60 s for open watches by default
BACKOFF_MESSAGE = "Job has reached the specified backoff limit"
EXPIRED = {
    "apiVersion": "v1",
    "kind": "Status",
    "metadata": {},
    "status": "Failure",
    "message": "too old resource version: 1 (2)",
    "reason": "Expired",
    "code": 410,
}
RESOURCES = (
    "batch/v1/jobs",
    "v1/pods",
    "coordination.k8s.io/v1/leases",
    # what a chart installs (tests/test_pods.py installs the rendered objects)
    "v1/secrets",
    "v1/configmaps",
    "v1/serviceaccounts",
    "rbac.authorization.k8s.io/v1/roles",
    "rbac.authorization.k8s.io/v1/rolebindings",
    "networking.k8s.io/v1/networkpolicies",
    "batch/v1/cronjobs",
)


# --- selectors (what a real API server filters server-side) -------------------------------


def _label_requirement(term: str) -> Callable[[dict[str, str]], bool]:
    term = term.strip()
    if "!=" in term:
        key, value = (p.strip() for p in term.split("!=", 1))
        return lambda labels: labels.get(key) != value
    if "=" in term:
        key, value = (p.strip() for p in term.replace("==", "=").split("=", 1))
        return lambda labels: labels.get(key) == value
    if term.startswith("!"):
        return lambda labels: term[1:] not in labels
    if " in " in term or " notin " in term or "(" in term:
        raise kmock.KubernetesError(400, "BadRequest", f"set-based selector not emulated: {term}")
    return lambda labels: term in labels


def _field_value(obj: dict[str, Any], path: str) -> Any:
    node: Any = obj
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def selected(obj: dict[str, Any], params: Any) -> bool:
    """Whether `obj` passes the request's labelSelector and fieldSelector."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in filter(None, (params.get("labelSelector") or "").split(",")):
        if not _label_requirement(term)(labels):
            return False
    for term in filter(None, (params.get("fieldSelector") or "").split(",")):
        negate = "!=" in term
        path, value = term.replace("!=", "=").replace("==", "=").split("=", 1)
        if (str(_field_value(obj, path.strip())) == value.strip()) == negate:
            return False
    return True


# --- the server -----------------------------------------------------------------------------


@attrs.define(kw_only=True)
class _Emulator(kmock.KubernetesEmulator):  # type: ignore[misc]
    """kmock's emulator; a request that came in on the pods' HTTPS port is authorized first
    (kmock itself stores a created or deleted object before any reaction runs)."""

    pod_port: int | None = None
    authorize: Callable[[kmock.Request], None] | None = None

    async def _handle(self, request: kmock.Request) -> Any:
        if self.authorize is not None and request.url.port == self.pod_port:
            self.authorize(request)  # raises kmock.KubernetesError (401, 403)
        return await super()._handle(request)


class KMock:
    """One kmock emulator on a loopback port, served from a private loop in a thread."""

    def __init__(self) -> None:
        self.pod_logs: dict[tuple[str, str], str] = {}  # (namespace, pod) -> log text
        self.created_at: list[tuple[str, str, float]] = []  # (plural, name, monotonic)
        self.expire_watches = 0  # answer this many watches from a resourceVersion with 410
        self._rv = itertools.count(1000)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="kmock", daemon=True)
        self._tls: list[asyncio.Server] = []
        self._relayed: dict[asyncio.Task[Any], set[asyncio.StreamWriter]] = {}  # open relays
        self.emu: _Emulator
        self.url = ""

    # lifecycle

    def start(self) -> KMock:
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None:
            raise RuntimeError(f"kmock did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(15)

    def __enter__(self) -> KMock:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()
        finally:
            self._loop.close()

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        self.emu = _Emulator()
        self._react(self.emu)
        async with self.emu, kmock.Server(self.emu) as server:
            server.server.runner._shutdown_timeout = SHUTDOWN_TIMEOUT_S  # type: ignore[union-attr]
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stopping.wait()
            for tls in self._tls:
                tls.close()
            for ends in self._relayed.values():
                for end in ends:
                    end.transport.abort()  # its pumps end at once
            if self._relayed:
                await asyncio.wait(list(self._relayed), timeout=2)

    # the pods' endpoint: HTTPS in front of the plain port, every request authorized

    def serve_https(
        self, certfile: str, keyfile: str, authorize: Callable[[kmock.Request], None]
    ) -> int:
        """Serve the API over TLS on a new loopback port (returned) for clients in pods,
        passing every request through `authorize` first. One such port per KMock."""

        async def start() -> int:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(certfile, keyfile)
            server = await asyncio.start_server(self._relay, "127.0.0.1", 0, ssl=context)
            self._tls.append(server)
            port: int = server.sockets[0].getsockname()[1]
            self.emu.pod_port, self.emu.authorize = port, authorize
            return port

        port: int = asyncio.run_coroutine_threadsafe(start(), self._loop).result(10)
        return port

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One TLS connection relayed byte for byte to the plain port (the Host header, and
        so the port the emulator sees in each request's URL, stays the TLS port's)."""
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(host, int(port))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                dst.close()

        task = asyncio.current_task()
        assert task is not None
        self._relayed[task] = {writer, up_writer}
        try:
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        finally:
            del self._relayed[task]

    def configuration(self) -> client.Configuration:
        return client.Configuration(host=self.url)

    def kubeconfig(self, namespace: str) -> str:
        """A kubeconfig (YAML is a superset of JSON) for a controller in another process."""
        return json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
                "users": [{"name": "test", "user": {"token": "test"}}],
                "contexts": [
                    {
                        "name": "kmock",
                        "context": {"cluster": "kmock", "user": "test", "namespace": namespace},
                    }
                ],
                "current-context": "kmock",
            }
        )

    # access from the test thread (the emulator lives in the server's loop)

    def call(self, fn: Callable[[], Any]) -> Any:
        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def requests(self, method: str | None = None, plural: str | None = None) -> list[Any]:
        def pick() -> list[Any]:
            return [
                r
                for r in self.emu
                if (method is None or r.method.value == method)
                and (plural is None or (r.resource is not None and r.resource.plural == plural))
            ]

        result: list[Any] = self.call(pick)
        return result

    def objects(self, resource: str) -> list[dict[str, Any]]:
        """Live objects of one kind, as raw dicts."""

        def pick() -> list[dict[str, Any]]:
            res = kmock.resource(resource)
            return [
                copy.deepcopy(obj.raw)
                for (r, _, _), obj in self.emu.objects.items()
                if r == res and not obj.deleted
            ]

        result: list[dict[str, Any]] = self.call(pick)
        return result

    # reactions: what kmock lacks (selectors, PUT, pod logs, CAS), covered here and never
    # in the controller

    def _react(self, emu: kmock.KubernetesEmulator) -> None:
        for plural in RESOURCES:
            emu.resources[plural] = kmock.ResourceInfo(namespaced=True)
        emu[kmock.action.LIST] << self._list
        emu[kmock.action.WATCH] << self._watch
        emu[kmock.action.CREATE] << self._created
        emu[kmock.method.PUT] << self._replace
        log_view = emu[kmock.action.FETCH, kmock.resource("v1/pods"), kmock.subresource("log")]
        log_view << {"Content-Type": "text/plain; charset=utf-8"} << self._pod_log

    async def _list(self, request: kmock.Request) -> dict[str, Any]:
        payload: Any = await self.emu._serve_list(request)
        items = [obj for obj in payload["items"] if selected(obj, request.params)]
        return {"metadata": {"resourceVersion": str(next(self._rv))}, "items": items}

    async def _watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        if self.expire_watches > 0 and request.params.get("resourceVersion"):
            # What a real server says when a watch's resourceVersion was compacted away.
            self.expire_watches -= 1
            yield b""
            yield {"type": "ERROR", "object": EXPIRED}
            return
        async for event in self.emu._serve_watch(request):
            if isinstance(event, dict) and not selected(event.get("object") or {}, request.params):
                continue
            yield event

    async def _created(self, request: kmock.Request) -> dict[str, Any]:
        assert request.resource is not None
        meta = (request.data or {}).get("metadata") or {}
        name = str(meta.get("name"))
        self.created_at.append((request.resource.plural or "", name, time.monotonic()))
        if request.resource == kmock.resource(RESOURCES[2]):  # leases: CAS needs a version
            key = (request.resource, request.namespace or meta.get("namespace"), name)
            async with self.emu._lock:
                self.emu.objects[key].patch({"metadata": {"resourceVersion": str(next(self._rv))}})
        created: dict[str, Any] = await self.emu._serve_create(request)  # type: ignore[assignment]
        return created

    async def _replace(self, request: kmock.Request) -> dict[str, Any]:
        """PUT: replace the whole object, refusing a stale metadata.resourceVersion (409)."""
        if request.resource is None or request.name is None:
            raise kmock.KubernetesEndpointNotFoundError()
        key = (request.resource, request.namespace, request.name)
        body = copy.deepcopy(request.data or {})
        async with self.emu._lock:
            if key not in self.emu.objects or self.emu.objects[key].deleted:
                raise kmock.KubernetesObjectNotFoundError()
            obj = self.emu.objects[key]
            current = (obj.raw.get("metadata") or {}).get("resourceVersion")
            sent = (body.get("metadata") or {}).get("resourceVersion")
            if sent is not None and sent != current:
                raise kmock.KubernetesError(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {request.resource.plural} "{request.name}":'
                    " the object has been modified; please apply your changes to the latest"
                    " version and try again",
                )
            body.setdefault("metadata", {})["resourceVersion"] = str(next(self._rv))
            obj.history.append(body)
            await self.emu._buses[request.resource].put({"type": "MODIFIED", "object": body})
        return body

    def _pod_log(self, request: kmock.Request) -> bytes:
        text = self.pod_logs.get((request.namespace or "", request.name or ""))
        if text is None:
            raise kmock.KubernetesObjectNotFoundError()
        lines = text.splitlines()
        tail = request.params.get("tailLines")
        if tail is not None:
            lines = lines[-int(tail) :] if int(tail) > 0 else []
        return ("\n".join(lines) + "\n").encode() if lines else b""


# --- the fake kubelet -----------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class FakeKubelet:
    """Runs the controller's Jobs by script instead of running the stages.

    `script` maps a stage to the actions of its successive Jobs (missing: "ok"):
    "ok" commits the expected manifest and completes the Job; "fail:N" fails it
    with a pod whose container exited N; "preempt" fails it with a disrupted pod
    (no podFailurePolicy); "evict-then-ok" has a disrupted pod replaced without
    failing the Job (podFailurePolicy Ignore) and then completes; "oom" fails it with a
    pod whose container the kernel killed at its memory limit (exit 137, OOMKilled);
    "hold" leaves the Job running.
    """

    kmock: KMock
    namespace: str
    cfg: config.PipelineConfig
    layout: RunLayout
    raw_uri: str
    script: dict[str, list[str]] = field(default_factory=dict)
    jobs: list[dict[str, Any]] = field(default_factory=list)  # as created, in order
    finished_at: dict[str, float] = field(default_factory=dict)  # job name -> monotonic
    errors: list[BaseException] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.calls: dict[str, StageCall] = {
            c.stage.name: c for c in plan(self.cfg, self.layout, self.raw_uri)
        }
        self.api = client.ApiClient(self.kmock.configuration())
        self.batch = client.BatchV1Api(self.api)
        self.core = client.CoreV1Api(self.api)
        self._watch = watch.Watch()
        self._seen: set[str] = set()
        self._changed = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="fake-kubelet", daemon=True)

    def __enter__(self) -> FakeKubelet:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopped = True
        self._watch.stop()
        self._thread.join(10)
        if self.errors:
            raise self.errors[0]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 30) -> None:
        """Block until `predicate()` holds (re-checked whenever a Job appears or ends)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate():
                if self.errors:
                    raise self.errors[0]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("condition not reached; jobs: " + ", ".join(self.names()))
                self._changed.wait(min(left, 0.2))

    def names(self) -> list[str]:
        return [j["metadata"]["name"] for j in self.jobs]

    def _run(self) -> None:
        while not self._stopped:
            try:
                for event in self._watch.stream(
                    self.batch.list_namespaced_job,
                    self.namespace,
                    _request_timeout=(5, 300),
                    deserialize=False,
                ):
                    job = event["object"]
                    name = job["metadata"]["name"]
                    if event["type"] != "ADDED" or name in self._seen or not self._ours(job):
                        continue
                    self._seen.add(name)
                    if (job.get("status") or {}).get("conditions"):
                        continue  # finished before this kubelet started (a watch replays it)
                    with self._changed:
                        self.jobs.append(job)
                        self._changed.notify_all()
                    try:
                        self._act(job)
                    except Exception as exc:
                        self._broke(job, exc)
            except (urllib3.exceptions.HTTPError, OSError):
                if not self._stopped:
                    time.sleep(0.05)

    def _ours(self, job: dict[str, Any]) -> bool:
        """A Job of this kubelet's run (several runs may share the namespace)."""
        labels = job["metadata"].get("labels") or {}
        return labels.get(LABEL_RUN_ID) == self.layout.run_id

    def _broke(self, job: dict[str, Any], exc: BaseException) -> None:
        """Record the kubelet's own error and fail the Job, so that no controller hangs
        (every later Job fails at once too; `__exit__` re-raises the first error)."""
        self.errors.append(exc)
        with contextlib.suppress(Exception):
            self._fail(job, "FakeKubeletError", f"{type(exc).__name__}: {exc}")
        with self._changed:
            self._changed.notify_all()

    def finish(self, name: str, action: str = "ok") -> None:
        """End a held Job now ("ok", "fail:N", "preempt", ...)."""
        job = next(j for j in self.jobs if j["metadata"]["name"] == name)
        self._act(job, action)

    def _act(self, job: dict[str, Any], action: str | None = None) -> None:
        if self.errors:
            raise RuntimeError("the fake kubelet already failed") from self.errors[0]
        stage = job["metadata"]["labels"]["app.kubernetes.io/component"]
        if action is None:
            steps = self.script.get(stage, [])
            action = steps.pop(0) if steps else "ok"
        if action == "hold":
            return
        if action == "ok":
            self._complete(job, stage)
        elif action == "evict-then-ok":
            self._pod(job, exit_code=137, disrupted=True, log="evicted\n")
            self._pod(job, exit_code=0, log=f"{stage} done\n")
            self._complete(job, stage)
        elif action == "preempt":
            self._pod(job, exit_code=137, disrupted=True, log="node lost\n")
            self._fail(job, "BackoffLimitExceeded", BACKOFF_MESSAGE)
        elif action == "oom":
            self._pod(job, exit_code=137, log=f"{stage}: allocating\n", reason="OOMKilled")
            self._fail(job, "BackoffLimitExceeded", "Job has reached the specified backoff limit")
        elif action.startswith("fail:"):
            code = int(action.split(":", 1)[1])
            lines = [f"{stage} line {i}" for i in range(150)] + [f"{stage}: error: exit {code}"]
            pod = self._pod(job, exit_code=code, log="\n".join(lines) + "\n")
            if code == 2:
                self._fail(
                    job,
                    "PodFailurePolicy",
                    f"Container stage for pod {self.namespace}/{pod} failed with exit code 2"
                    " matching FailJob rule at index 1",
                )
            else:
                self._fail(
                    job, "BackoffLimitExceeded", "Job has reached the specified backoff limit"
                )
        else:
            raise ValueError(f"unknown fake kubelet action {action!r}")

    def _complete(self, job: dict[str, Any], stage: str) -> None:
        call = self.calls[stage]
        expected_args = [*call.argv[1:], "--run-id", self.layout.run_id]
        args = job["spec"]["template"]["spec"]["containers"][0]["args"]
        if args != expected_args:
            raise AssertionError(f"{job['metadata']['name']}: args {args} != {expected_args}")

        def body(work: Any) -> dict[str, Any]:
            (work / "output.txt").write_text(f"{stage} of {self.layout.run_id}\n")
            return {}

        inputs = input_fingerprints(call.inputs)
        commit_stage(stage, open_store(call.out_uri), call.settings, inputs, body)
        self._status(
            job,
            {
                "active": 0,
                "succeeded": 1,
                "completionTime": _now(),
                "conditions": [
                    {"type": "SuccessCriteriaMet", "status": "True"},
                    {"type": "Complete", "status": "True", "lastTransitionTime": _now()},
                ],
            },
        )

    def _fail(self, job: dict[str, Any], reason: str, message: str) -> None:
        condition = {"status": "True", "reason": reason, "message": message}
        self._status(
            job,
            {
                "active": 0,
                "failed": 1,
                "conditions": [
                    {"type": "FailureTarget", **condition},
                    {"type": "Failed", **condition},
                ],
            },
        )

    def _status(self, job: dict[str, Any], status: dict[str, Any]) -> None:
        name = job["metadata"]["name"]
        self.finished_at[name] = time.monotonic()
        self.batch.patch_namespaced_job_status(
            name, self.namespace, {"status": status}, _preload_content=False
        )
        with self._changed:
            self._changed.notify_all()

    def _pod(
        self,
        job: dict[str, Any],
        exit_code: int,
        log: str,
        disrupted: bool = False,
        reason: str | None = None,
    ) -> str:
        job_name = job["metadata"]["name"]
        name = f"{job_name}-{secrets.token_hex(3)}"[:63]
        conditions = []
        if disrupted:
            conditions.append(
                {
                    "type": "DisruptionTarget",
                    "status": "True",
                    "reason": "PreemptionByScheduler",
                    "message": "Preempted in order to admit critical pod",
                }
            )
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": {
                    **job["spec"]["template"]["metadata"].get("labels", {}),
                    "job-name": job_name,
                    "batch.kubernetes.io/job-name": job_name,
                },
                "creationTimestamp": _now(),
            },
            "spec": job["spec"]["template"]["spec"],
            "status": {
                "phase": "Succeeded" if exit_code == 0 else "Failed",
                "conditions": conditions,
                "containerStatuses": [
                    {
                        "name": "stage",
                        "ready": False,
                        "restartCount": 0,
                        "image": "skinlesion:test",
                        "imageID": "",
                        "state": {
                            "terminated": {
                                "exitCode": exit_code,
                                "reason": reason or ("Completed" if exit_code == 0 else "Error"),
                                "finishedAt": _now(),
                            }
                        },
                    }
                ],
            },
        }
        self.kmock.pod_logs[(self.namespace, name)] = log
        # As is, and no model for the answer: the client's models refuse int quantities
        # (`nvidia.com/gpu: 1`) that the API server accepts.
        create = client.CoreV1Api.create_namespaced_pod.raw_function  # type: ignore[attr-defined]
        create(self.core, self.namespace, pod, _preload_content=False)
        return name
