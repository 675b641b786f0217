"""The run's Lease: one live controller per run id.

A coordination.k8s.io/v1 Lease `<release>-<run-id>`, renewed in the background, keeps
a second controller for the same run id from proceeding; an expired Lease is taken over.
"""

from __future__ import annotations

import copy
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from skinlesion import logs
from skinlesion.errors import ConfigError, SkinlesionError

if TYPE_CHECKING:
    from skinlesion.kube import Kube


class LeaseHeld(SkinlesionError):
    """Another live controller holds this run's Lease."""


class LeaseLost(SkinlesionError):
    """This controller could not renew its Lease in time; another one may drive the run."""


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
