"""One writer per run: a lock object `runs/<id>/lock.json` in the store.

Every executor's run loop (`pipeline.run_pipeline`) holds it for the whole run, so
two `skinlesion run` (or a run and a controller) of the same run id on one store
cannot write the same prefixes at once. The object records its holder (host, pid
namespace, pid, a random token) and when it started, last heartbeat and expires.

- acquire: an atomic create (`Store.put_bytes_if_absent`: O_EXCL-like link on files,
  `If-None-Match: *` on S3), so of two racing processes exactly one wins;
- a lock held by someone else is refused at once (RunLocked, exit code 3) naming the
  holder, unless it is dead: its heartbeat expired (by this machine's clock: hosts must
  keep their clocks roughly in sync, well within the lock's lifetime), or it was taken
  on this host (same pid namespace) by a process that no longer exists. A dead lock is
  taken over by a compare-and-swap (`Store.swap_bytes`) on the exact bytes that were
  read, so two processes taking over the same dead lock cannot both win;
- the holder heartbeats from a daemon thread every quarter of the lifetime (CAS from
  its last write). When a heartbeat finds the lock changed, or cannot renew before it
  expires, the lock is lost: `check()` raises and the run stops before its next stage;
- release (also on SIGTERM / Ctrl-C, which unwind through the `with`) deletes the
  object by CAS, so a lock taken over by someone else is never removed.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from skinlesion import logs
from skinlesion.errors import EXIT_RUN_LOCKED, InputError, SkinlesionError, StoreError
from skinlesion.storage import Store

LOCK_KEY = "lock.json"
DEFAULT_TTL_S = 60.0  # lifetime of one heartbeat; renewed every quarter of it
_ACQUIRE_ROUNDS = 5  # create / take-over attempts before giving up on a churning lock


class RunLocked(SkinlesionError):
    """Another live process holds this run's lock (or this process lost it)."""

    exit_code = EXIT_RUN_LOCKED


@dataclass(frozen=True)
class Holder:
    host: str
    pidns: str  # pid namespace: a pid means the same process only within one
    pid: int
    token: str
    started: str  # ISO 8601, UTC
    heartbeat: str
    expires: str

    def describe(self) -> str:
        return (
            f"host {self.host} pid {self.pid} (started {self.started}, heartbeat {self.heartbeat})"
        )

    def expired(self, now: float) -> bool:
        return _epoch(self.expires) <= now

    def dead_here(self) -> bool:
        """Taken on this host by a process that does not exist any more."""
        if (self.host, self.pidns) != (_host(), _pidns()) or self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # exists, owned by someone else
            return False
        return False


def _host() -> str:
    return os.environ.get("HOSTNAME") or socket.gethostname()


def _pidns() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _parse(data: bytes) -> Holder | None:
    """The holder recorded in a lock object; None when it is not one (e.g. truncated)."""
    try:
        raw = json.loads(data)
        holder = Holder(**{k: raw[k] for k in Holder.__dataclass_fields__})
        _epoch(holder.expires)
    except (ValueError, TypeError, KeyError):
        return None
    return holder


class RunLock:
    """The lock of one run prefix; `acquire()`, then `release()` (or use `hold`)."""

    def __init__(self, run_store: Store, run_id: str, ttl_s: float = DEFAULT_TTL_S) -> None:
        if ttl_s <= 0:
            raise InputError(f"run lock lifetime must be > 0 s, got {ttl_s}")
        self.store = run_store
        self.run_id = run_id
        self.ttl_s = ttl_s
        self.uri = f"{run_store.uri}/{LOCK_KEY}"
        self.lost = threading.Event()
        self._token = secrets.token_hex(16)
        self._started = time.time()
        self._written: bytes | None = None  # what we last wrote: the CAS expectation
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        now = time.time()
        holder = Holder(
            host=_host(),
            pidns=_pidns(),
            pid=os.getpid(),
            token=self._token,
            started=_iso(self._started),
            heartbeat=_iso(now),
            expires=_iso(now + self.ttl_s),
        )
        return json.dumps({"run_id": self.run_id, **asdict(holder)}, indent=2).encode() + b"\n"

    def _read(self) -> bytes | None:
        try:
            return self.store.get_bytes(LOCK_KEY)
        except InputError as exc:
            if str(exc).startswith("not found"):
                return None
            raise

    def _is_mine(self, data: bytes | None) -> bool:
        holder = _parse(data) if data is not None else None
        return holder is not None and holder.token == self._token

    def acquire(self) -> None:
        """Take the lock, or raise RunLocked naming its live holder."""
        log = logs.get()
        for _ in range(_ACQUIRE_ROUNDS):
            record = self._record()
            if self.store.put_bytes_if_absent(LOCK_KEY, record):
                self._written = record
                log.info("run_lock_acquired", lock=self.uri)
                return
            current = self._read()
            if current is None:
                continue  # released meanwhile: try to create it again
            if self._is_mine(current):  # our create landed, its reply was lost and retried
                self._written = current
                log.info("run_lock_acquired", lock=self.uri)
                return
            holder = _parse(current)
            if holder is not None and not holder.expired(time.time()) and not holder.dead_here():
                raise RunLocked(
                    f"run {self.run_id} is already being written by {holder.describe()}; "
                    f"lock {self.uri} expires {holder.expires} unless renewed: "
                    "wait for that run to end (or stop it), then run again"
                )
            if self.store.swap_bytes(LOCK_KEY, current, record) or self._is_mine(self._read()):
                self._written = record
                log.warning(
                    "run_lock_taken_over",
                    lock=self.uri,
                    previous=holder.describe() if holder else "unreadable lock object",
                    reason="expired"
                    if holder is None or holder.expired(time.time())
                    else "its process is gone",
                )
                return
        raise RunLocked(f"run {self.run_id}: lock {self.uri} kept changing; try again")

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def heartbeat(self) -> bool:
        """Renew once (CAS from our last write); False when the lock is no longer ours."""
        assert self._written is not None
        record = self._record()
        # `or`: a retried write whose first try had landed reads back as ours
        if self.store.swap_bytes(LOCK_KEY, self._written, record) or self._read() == record:
            self._written = record
            return True
        return False

    def _beat(self) -> None:
        log = logs.get()
        interval = self.ttl_s / 4
        last_ok = time.monotonic()
        while not self._stop.wait(interval):
            try:
                if self.heartbeat():
                    last_ok = time.monotonic()
                    continue
                log.error("run_lock_lost", lock=self.uri, reason="taken over by another process")
            except (StoreError, InputError) as exc:
                log.warning("run_lock_heartbeat_failed", lock=self.uri, error=str(exc))
                if time.monotonic() - last_ok < self.ttl_s - interval:
                    continue
                log.error("run_lock_lost", lock=self.uri, reason="not renewed in time")
            self.lost.set()
            return

    def check(self) -> None:
        """Raise RunLocked when the heartbeat lost the lock (another writer may be active)."""
        if self.lost.is_set():
            raise RunLocked(
                f"run {self.run_id}: lost the run lock {self.uri} (not renewed in time or "
                "taken over); stopping so that two processes do not write the run"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        if self._written is None or self.lost.is_set():
            return
        try:
            if self.store.swap_bytes(LOCK_KEY, self._written, None):
                logs.get().info("run_lock_released", lock=self.uri)
        except (StoreError, InputError) as exc:  # it expires on its own
            logs.get().warning("run_lock_release_failed", lock=self.uri, error=str(exc))
        self._written = None


@contextmanager
def hold(run_store: Store, run_id: str, ttl_s: float = DEFAULT_TTL_S) -> Iterator[RunLock]:
    """Hold the run's lock, heartbeating, for the duration of the block."""
    lock = RunLock(run_store, run_id, ttl_s)
    lock.acquire()
    try:
        lock.start_heartbeat()
        yield lock
    finally:
        lock.release()


def holder(run_store: Store) -> Holder | None:
    """Who holds the run's lock now (None: nobody, or the lock expired)."""
    if not run_store.exists(LOCK_KEY):
        return None
    found = _parse(run_store.get_bytes(LOCK_KEY))
    return found if found is not None and not found.expired(time.time()) else None
