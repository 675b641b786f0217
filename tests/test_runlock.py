"""One writer per run: the store lock `runs/<id>/lock.json`, on files and on real S3."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from skinlesion import config, runlock
from skinlesion.errors import EXIT_DAMAGED_RUN, EXIT_INTERRUPTED, EXIT_RUN_LOCKED
from skinlesion.layout import RunLayout
from skinlesion.manifest import read_manifest
from skinlesion.pipeline import run_pipeline
from skinlesion.runlock import LOCK_KEY, RunLock, RunLocked
from skinlesion.storage import FileStore, S3Store, Store, get_json, open_store, put_json
from skinlesion.synthetic import write_sample_data
from tests.runs import RUN_TIMEOUT_S, run_command, skinlesion_run
from tests.test_pipeline import ScriptedExecutor


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """A run prefix on each backend (S3: the real SeaweedFS server)."""
    if request.param == "file":
        return FileStore(tmp_path / "store").child("runs", "r1")
    s3: S3Store = request.getfixturevalue("s3_store")
    return s3.child("runs", "r1")


def _iso(dt: datetime) -> str:
    return dt.isoformat(timespec="milliseconds")


def _foreign(store: Store, **fields: Any) -> bytes:
    """Write a lock object as another process would; returns its bytes."""
    now = datetime.now(UTC)
    record = {
        "run_id": "r1",
        "host": "other-host",
        "pidns": "pid:[1]",
        "pid": 4242,
        "token": "f" * 32,
        "started": _iso(now - timedelta(minutes=5)),
        "heartbeat": _iso(now),
        "expires": _iso(now + timedelta(minutes=5)),
        **fields,
    }
    put_json(store, LOCK_KEY, record)
    return store.get_bytes(LOCK_KEY)


def test_acquire_records_the_holder_and_release_removes_it(store: Store) -> None:
    lock = RunLock(store, "r1", ttl_s=30)
    lock.acquire()
    held = get_json(store, LOCK_KEY)
    assert held["pid"] == os.getpid() and held["run_id"] == "r1"
    assert len(held["token"]) == 32
    started, beat, expires = (
        datetime.fromisoformat(held[k]) for k in ("started", "heartbeat", "expires")
    )
    assert started <= beat < expires
    assert 25 < (expires - beat).total_seconds() <= 30
    lock.release()
    assert not store.exists(LOCK_KEY)
    again = RunLock(store, "r1")  # free again
    again.acquire()
    again.release()


def test_second_writer_is_refused_at_once_naming_the_holder(store: Store) -> None:
    with runlock.hold(store, "r1", ttl_s=30):
        holder = get_json(store, LOCK_KEY)
        start = time.monotonic()
        with pytest.raises(RunLocked) as info:
            RunLock(store, "r1").acquire()
        assert time.monotonic() - start < 15  # at once: not after the holder's 30 s
        message = str(info.value)
        assert f"host {holder['host']} pid {os.getpid()}" in message
        assert "\n" not in message and f"{store.uri}/{LOCK_KEY}" in message
        assert info.value.exit_code == EXIT_RUN_LOCKED
        assert get_json(store, LOCK_KEY)["token"] == holder["token"]  # untouched
    assert not store.exists(LOCK_KEY)


def test_heartbeat_keeps_a_short_lock_alive(store: Store) -> None:
    with runlock.hold(store, "r1", ttl_s=1.2) as lock:
        first = get_json(store, LOCK_KEY)
        time.sleep(2.5)  # two lifetimes: only heartbeats keep it
        now = get_json(store, LOCK_KEY)
        assert now["token"] == first["token"] and now["started"] == first["started"]
        assert now["expires"] > first["expires"]
        with pytest.raises(RunLocked):
            RunLock(store, "r1").acquire()
        lock.check()  # still ours
    assert not store.exists(LOCK_KEY)


def test_expired_lock_of_another_host_is_taken_over(store: Store) -> None:
    past = datetime.now(UTC) - timedelta(seconds=1)
    _foreign(store, heartbeat=_iso(past - timedelta(seconds=60)), expires=_iso(past))
    lock = RunLock(store, "r1", ttl_s=30)
    lock.acquire()
    assert get_json(store, LOCK_KEY)["pid"] == os.getpid()
    lock.release()
    assert not store.exists(LOCK_KEY)


def test_unexpired_lock_of_another_host_is_respected(store: Store) -> None:
    _foreign(store)
    with pytest.raises(RunLocked, match="host other-host pid 4242"):
        RunLock(store, "r1").acquire()


def test_lock_of_a_dead_process_on_this_host_is_taken_over(store: Store) -> None:
    probe = RunLock(store, "r1")  # this process's own identity (host, pid namespace)
    probe.acquire()
    mine = get_json(store, LOCK_KEY)
    probe.release()
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    here = {"host": mine["host"], "pidns": mine["pidns"]}
    _foreign(store, pid=int(done.stdout), **here)  # unexpired, but its process has exited
    lock = RunLock(store, "r1", ttl_s=30)
    lock.acquire()
    assert get_json(store, LOCK_KEY)["token"] == lock._token
    lock.release()
    # ... while an unexpired lock of a live process of this host (this one) is respected
    _foreign(store, pid=os.getpid(), **here)
    with pytest.raises(RunLocked):
        RunLock(store, "r1").acquire()


def _race(store: Store, n: int) -> list[str]:
    """n acquirers released at one instant; each returns 'won' or 'refused'."""
    barrier = threading.Barrier(n)
    results: list[str] = []

    def contender() -> None:
        lock = RunLock(store, "r1", ttl_s=30)
        barrier.wait()
        try:
            lock.acquire()
        except RunLocked:
            results.append("refused")
        else:
            results.append("won")

    threads = [threading.Thread(target=contender) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_racing_acquirers_exactly_one_wins(store: Store) -> None:
    results = _race(store, 8)
    assert sorted(results) == ["refused"] * 7 + ["won"]


def test_racing_takeovers_of_a_dead_lock_exactly_one_wins(store: Store) -> None:
    past = datetime.now(UTC) - timedelta(seconds=5)
    _foreign(store, expires=_iso(past))
    results = _race(store, 8)
    assert sorted(results) == ["refused"] * 7 + ["won"]
    assert get_json(store, LOCK_KEY)["pid"] == os.getpid()


def test_racing_processes_exactly_one_wins(tmp_path: Path) -> None:
    """Separate processes (not threads) on the file store: O_EXCL-like create decides."""
    store_dir = tmp_path / "store"
    code = (
        "import sys, time\n"
        "from skinlesion.runlock import RunLock, RunLocked\n"
        "from skinlesion.storage import open_store\n"
        "lock = RunLock(open_store(sys.argv[1]), 'r1', ttl_s=30)\n"
        "while time.time() < float(sys.argv[2]): time.sleep(0.001)\n"
        "try:\n    lock.acquire()\nexcept RunLocked:\n    print('refused')\n"
        "else:\n    print('won')\n"
    )
    at = str(time.time() + 3)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(store_dir / "runs/r1"), at],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(4)
    ]
    outs = sorted(p.communicate(timeout=120)[0].strip().splitlines()[-1] for p in procs)
    assert outs == ["refused"] * 3 + ["won"]


def test_release_never_removes_a_lock_taken_over_by_another(store: Store) -> None:
    stalled = RunLock(store, "r1", ttl_s=0.3)  # no heartbeat: as if the process hung
    stalled.acquire()
    time.sleep(0.5)
    taker = RunLock(store, "r1", ttl_s=30)
    taker.acquire()
    assert stalled.heartbeat() is False  # the lock is no longer its own
    stalled.release()
    assert get_json(store, LOCK_KEY)["token"] == taker._token
    taker.release()
    assert not store.exists(LOCK_KEY)


def test_a_lost_lock_stops_the_holder(store: Store) -> None:
    with runlock.hold(store, "r1", ttl_s=1.0) as lock:
        _foreign(store)  # someone overwrote it
        deadline = time.monotonic() + 10
        while not lock.lost.is_set():
            assert time.monotonic() < deadline, "the heartbeat did not notice"
            time.sleep(0.05)
        with pytest.raises(RunLocked, match="lost the run lock"):
            lock.check()
    assert get_json(store, LOCK_KEY)["token"] == "f" * 32  # not removed on the way out


# --- the run loop holds it ----------------------------------------------------------------


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = f"file://{tmp_path_factory.mktemp('raw')}"
    write_sample_data(open_store(uri), images=70, seed=1)
    return uri


def test_run_pipeline_is_refused_while_the_run_is_locked(tmp_path: Path, raw: str) -> None:
    layout = RunLayout(f"file://{tmp_path}/store", "r1")
    cfg = config.load_pipeline("tiny")
    ex = ScriptedExecutor()
    with (
        runlock.hold(open_store(layout.run_uri), "r1"),
        pytest.raises(RunLocked, match=f"pid {os.getpid()}"),
    ):
        run_pipeline(cfg, layout, ex, raw_uri=raw, retry_delay_s=0)
    assert ex.calls == []
    report = run_pipeline(cfg, layout, ex, raw_uri=raw, retry_delay_s=0)  # free again
    assert [s.status for s in report.stages] == ["done"] * len(report.stages)
    assert not open_store(layout.run_uri).exists(LOCK_KEY)


def test_run_pipeline_releases_the_lock_when_interrupted(tmp_path: Path, raw: str) -> None:
    class Interrupted(ScriptedExecutor):
        def run(self, call: Any, run_id: str, attempt: int) -> Any:
            assert open_store(RunLayout(f"file://{tmp_path}/store", "r1").run_uri).exists(LOCK_KEY)
            raise KeyboardInterrupt

    layout = RunLayout(f"file://{tmp_path}/store", "r1")
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config.load_pipeline("tiny"), layout, Interrupted(), raw_uri=raw)
    assert not open_store(layout.run_uri).exists(LOCK_KEY)


# --- two real `skinlesion run` processes --------------------------------------------------


def _run_cmd(store_uri: str) -> list[str]:
    return run_command(store_uri, run_id="same")


def _wait_for_lock(path: Path, proc: subprocess.Popen[str]) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while not path.is_file():
        assert proc.poll() is None, "the first run ended before taking its lock"
        assert time.monotonic() < deadline, "no lock after 2 minutes"
        time.sleep(0.05)
    return json.loads(path.read_text())


@pytest.mark.slow
def test_concurrent_runs_of_one_id_second_is_refused_first_finishes(tmp_path: Path) -> None:
    store_uri = f"file://{tmp_path}/store"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    first = subprocess.Popen(
        _run_cmd(store_uri), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        lock_path = tmp_path / "store/runs/same/lock.json"
        holder = _wait_for_lock(lock_path, first)
        assert holder["pid"] == first.pid
        second = subprocess.run(
            _run_cmd(store_uri), env=env, capture_output=True, text=True, timeout=120
        )
        assert "stage_start" not in second.stderr  # refused at start-up, not after a stage
        assert second.returncode == EXIT_RUN_LOCKED, second.stderr[-2000:]
        errors = [x for x in second.stderr.splitlines() if x.startswith("skinlesion run: error")]
        assert len(errors) == 1
        assert f"host {holder['host']} pid {first.pid}" in errors[0]
        assert "stage_start" not in second.stderr
        out, err = first.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, err[-3000:]
    assert "run same:" in out
    store = open_store(store_uri)
    assert read_manifest(store.child("runs", "same", "promote")) is not None
    assert not lock_path.exists()  # released at the end

    # What the two writers of the original bug left: finetune's model rewritten (other
    # bytes, same fingerprint) after evaluate had committed. Promote sees a damaged run
    # (exit 4, not bad input); a rerun of the run id recomputes evaluate and repairs it.
    run = store.child("runs", "same")
    finetune = run.child("finetune")
    manifest = read_manifest(finetune)
    assert manifest is not None
    other = run.child("train").get_bytes("model.keras")
    manifest["files"]["model.keras"] = {
        "sha256": finetune.put_bytes("model.keras", other),
        "size": len(other),
    }
    put_json(finetune, "manifest.json", manifest)
    argv = [*("--candidate", run.child("evaluate").uri, "--model", finetune.uri)]
    argv += ["--target", store.child("models", "latest").uri, "--run-id", "same"]
    damaged = subprocess.run(
        [sys.executable, "-m", "skinlesion", "promote", *argv],
        env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )  # fmt: skip
    assert damaged.returncode == EXIT_DAMAGED_RUN, damaged.stderr[-2000:]
    assert "damaged run" in damaged.stderr and "rerun the same run id" in damaged.stderr
    repaired = skinlesion_run(store_uri, run_id="same")
    assert repaired.returncode == 0, repaired.stderr[-3000:]
    started = [json.loads(x) for x in repaired.stderr.splitlines() if x.startswith("{")]
    assert [x["step"] for x in started if x.get("event") == "stage_start"] == [
        "evaluate",
        "promote",
    ]


def test_sigterm_releases_the_lock(tmp_path: Path) -> None:
    """The run's lock goes with the run process on SIGTERM (exit 143), not at expiry."""
    store_uri = f"file://{tmp_path}/store"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.Popen(
        _run_cmd(store_uri),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lock_path = tmp_path / "store/runs/same/lock.json"
    try:
        _wait_for_lock(lock_path, proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == EXIT_INTERRUPTED, err[-2000:]
    assert not lock_path.exists()
