"""The Kubernetes API client layer: the only module that imports `kubernetes`.

Objects go in and come out as plain dicts in API (camelCase) form, the form of
the Job manifests the Helm chart renders, so the controller never touches client
models. API errors become the small exception family below; transient failures
(connection errors, 429, 5xx) are retried here a few times, so the controller
only sees answers: an object, `NotFound`, `Conflict`, `Gone`, or a lasting failure.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

import urllib3
from kubernetes import client, config, watch

from skinlesion import logs
from skinlesion.errors import ConfigError, SkinlesionError

T = TypeVar("T")
ATTEMPTS = 4  # per API call, for transient failures
CONNECT_TIMEOUT_S = 10.0
CALL_TIMEOUT_S = 30.0
IN_CLUSTER_ENV = "KUBERNETES_SERVICE_HOST"
SERVICEACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def _read_or_none(what: str, read: Any, name: str, namespace: str) -> dict[str, Any] | None:
    """One object by name as a dict, or None when it does not exist."""
    try:
        return _json(
            _call(
                what,
                lambda: read(
                    name, namespace, _preload_content=False, _request_timeout=CALL_TIMEOUT_S
                ),
            )
        )
    except NotFound:
        return None


class ApiError(SkinlesionError):
    """The API server refused or failed a request (after retries when transient)."""

    def __init__(self, status: int, reason: str, message: str = "") -> None:
        super().__init__(f"Kubernetes API: {status} {reason}" + (f": {message}" if message else ""))
        self.status = status
        self.reason = reason


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    """409: the name is taken (create) or the resourceVersion is stale (replace)."""


class Gone(ApiError):
    """410: a watch's resourceVersion is too old; list again."""


def _error(exc: client.ApiException) -> ApiError:
    status = int(exc.status or 0)
    message = ""
    try:
        message = json.loads(exc.body or "{}").get("message", "")
    except (ValueError, AttributeError):
        message = str(exc.body or "")[:300]
    cls = {404: NotFound, 409: Conflict, 410: Gone}.get(status, ApiError)
    return cls(status, str(exc.reason or ""), message)


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, client.ApiException):
        return int(exc.status or 0) in (0, 429, 500, 502, 503, 504)
    return isinstance(exc, urllib3.exceptions.HTTPError | ConnectionError)


def _call(what: str, fn: Callable[[], T]) -> T:
    """Run one API call, retrying transient failures with a short back-off."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return fn()
        except (client.ApiException, urllib3.exceptions.HTTPError, ConnectionError) as exc:
            if attempt == ATTEMPTS or not _transient(exc):
                if isinstance(exc, client.ApiException):
                    raise _error(exc) from None
                raise ApiError(0, type(exc).__name__, f"{what}: {exc}") from None
            logs.get().warning("kube_retry", call=what, attempt=attempt, error=str(exc)[:200])
            time.sleep(0.2 * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def _json(response: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(response.data)
    return data


def default_namespace() -> str | None:
    """The pod's own namespace when running in a cluster, else None."""
    try:
        with open(SERVICEACCOUNT_NAMESPACE) as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def load_configuration(kubeconfig: str | None = None, in_cluster: bool | None = None) -> Any:
    """Client configuration: in-cluster service account, or a kubeconfig file.

    `in_cluster=None` picks in-cluster when the pod environment says so
    (KUBERNETES_SERVICE_HOST set) and no kubeconfig was named.
    """
    if in_cluster is None:
        in_cluster = kubeconfig is None and IN_CLUSTER_ENV in os.environ
    configuration = client.Configuration()
    try:
        if in_cluster:
            config.load_incluster_config(client_configuration=configuration)
        else:
            config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    except (config.ConfigException, OSError) as exc:
        where = "in-cluster service account" if in_cluster else (kubeconfig or "~/.kube/config")
        message = f"cannot load Kubernetes credentials from {where}: {exc}"
        raise ConfigError("kubeconfig", message) from None
    return configuration


class JobWatch:
    """One watch stream on Jobs; iterate for (event type, raw Job); `stop()` from any thread."""

    def __init__(
        self,
        api: client.BatchV1Api,
        namespace: str,
        field_selector: str | None,
        label_selector: str | None,
        resource_version: str | None,
        timeout_s: float,
    ) -> None:
        self._api = api
        # return_type=object: events carry the raw dicts, with no client-model validation
        # (and the client's own ERROR/410 handling keeps working, unlike deserialize=False).
        self._watch = watch.Watch(return_type=object)
        self._kwargs: dict[str, Any] = {
            "timeout_seconds": max(1, round(timeout_s)),  # the server ends the stream then
            # ...and a client read timeout in case it does not (an idle proxy, an emulator)
            "_request_timeout": (CONNECT_TIMEOUT_S, timeout_s + min(15.0, 1 + timeout_s / 4)),
        }
        if field_selector:
            self._kwargs["field_selector"] = field_selector
        if label_selector:
            self._kwargs["label_selector"] = label_selector
        if resource_version:
            self._kwargs["resource_version"] = resource_version
            self._kwargs["allow_watch_bookmarks"] = True
        self._namespace = namespace
        self.resource_version = resource_version

    def stop(self) -> None:
        self._watch.stop()

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Events until the server ends the stream; a broken stream ends it too (re-list)."""
        try:
            stream = self._watch.stream(
                self._api.list_namespaced_job, self._namespace, **self._kwargs
            )
            for event in stream:
                kind = event.get("type")
                obj = event.get("raw_object") or {}
                if kind == "ERROR":
                    code = int(obj.get("code") or 0)
                    cls = Gone if code == 410 else ApiError
                    raise cls(code, str(obj.get("reason", "")), str(obj.get("message", "")))
                rv = (obj.get("metadata") or {}).get("resourceVersion")
                if rv:
                    self.resource_version = rv
                if kind == "BOOKMARK":
                    continue
                yield kind, obj
        except client.ApiException as exc:
            raise _error(exc) from None
        except (urllib3.exceptions.HTTPError, OSError, ValueError):
            return  # read timeout, reset, or a stopped socket: the caller re-lists


class Kube:
    """Typed-by-convention access to the few API calls the controller makes."""

    def __init__(self, configuration: Any) -> None:
        self.api_client = client.ApiClient(configuration)
        self.batch = client.BatchV1Api(self.api_client)
        self.core = client.CoreV1Api(self.api_client)
        self.coordination = client.CoordinationV1Api(self.api_client)

    @classmethod
    def connect(cls, kubeconfig: str | None = None, in_cluster: bool | None = None) -> Kube:
        return cls(load_configuration(kubeconfig, in_cluster))

    def close(self) -> None:
        self.api_client.close()

    # Jobs

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return _read_or_none(f"get job {name}", self.batch.read_namespaced_job, name, namespace)

    def list_jobs(
        self, namespace: str, field_selector: str | None = None, label_selector: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Matching Jobs and the list's resourceVersion (where a watch starts)."""
        data = _json(
            _call(
                "list jobs",
                lambda: self.batch.list_namespaced_job(
                    namespace,
                    field_selector=field_selector,
                    label_selector=label_selector,
                    _preload_content=False,
                    _request_timeout=CALL_TIMEOUT_S,
                ),
            )
        )
        return list(data.get("items") or []), (data.get("metadata") or {}).get("resourceVersion")

    def create_job(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        """Create a Job from its manifest as is; `Conflict` when the name exists.

        The manifest goes out unchanged, bypassing the client models' own validation,
        which is stricter than the API server's (a YAML quantity like
        `nvidia.com/gpu: 1` is an int, valid for the server, refused by the model).
        The API server validates it.
        """
        create = client.BatchV1Api.create_namespaced_job.raw_function  # type: ignore[attr-defined]
        return _json(
            _call(
                f"create job {body['metadata']['name']}",
                lambda: create(
                    self.batch,
                    namespace,
                    body,
                    _preload_content=False,
                    _request_timeout=CALL_TIMEOUT_S,
                ),
            )
        )

    def delete_job(self, namespace: str, name: str) -> bool:
        """Delete a Job and, in the background, its pods; False when it was already gone."""
        try:
            _call(
                f"delete job {name}",
                lambda: self.batch.delete_namespaced_job(
                    name,
                    namespace,
                    propagation_policy="Background",
                    _preload_content=False,
                    _request_timeout=CALL_TIMEOUT_S,
                ),
            )
            return True
        except NotFound:
            return False

    def watch_jobs(
        self,
        namespace: str,
        field_selector: str | None = None,
        label_selector: str | None = None,
        resource_version: str | None = None,
        timeout_s: float = 60.0,
    ) -> JobWatch:
        return JobWatch(
            self.batch, namespace, field_selector, label_selector, resource_version, timeout_s
        )

    # Pods

    def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        data = _json(
            _call(
                "list pods",
                lambda: self.core.list_namespaced_pod(
                    namespace,
                    label_selector=label_selector,
                    _preload_content=False,
                    _request_timeout=CALL_TIMEOUT_S,
                ),
            )
        )
        return list(data.get("items") or [])

    def pod_log(self, namespace: str, name: str, container: str, tail_lines: int) -> str:
        response: Any = _call(
            f"log of pod {name}",
            lambda: self.core.read_namespaced_pod_log(
                name,
                namespace,
                container=container,
                tail_lines=tail_lines,
                _preload_content=False,
                _request_timeout=CALL_TIMEOUT_S,
            ),
        )
        return bytes(response.data).decode(errors="replace")

    # Leases (coordination.k8s.io/v1)

    def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        return _read_or_none(
            f"get lease {name}", self.coordination.read_namespaced_lease, name, namespace
        )

    def create_lease(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return _json(
            _call(
                "create lease",
                lambda: self.coordination.create_namespaced_lease(
                    namespace,
                    cast(Any, body),
                    _preload_content=False,
                    _request_timeout=CALL_TIMEOUT_S,
                ),
            )
        )

    def replace_lease(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """Replace (PUT) a Lease; `Conflict` when body's resourceVersion is stale (CAS)."""
        return _json(
            _call(
                f"replace lease {name}",
                lambda: self.coordination.replace_namespaced_lease(
                    name,
                    namespace,
                    cast(Any, body),
                    _preload_content=False,
                    _request_timeout=CALL_TIMEOUT_S,
                ),
            )
        )
