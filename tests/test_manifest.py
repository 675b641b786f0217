"""The commit protocol on both backends: outputs first, manifest.json last.

The crash tests run commit_stage in a child process and SIGKILL it, once in the
middle of the body and once in the middle of the upload, then check that nothing
looks finished, that resume state survived, and that the next attempt cleans up.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from skinlesion import __version__
from skinlesion.errors import InputError, StageFailed
from skinlesion.manifest import (
    MANIFEST,
    OWNER,
    STATE_PREFIX,
    claim,
    commit_stage,
    fingerprint,
    is_done,
    read_manifest,
    require_manifest,
)
from skinlesion.storage import ObjectInfo, Store, get_json, open_store, put_json
from skinlesion.storage.base import Upload

BACKENDS = ["file", pytest.param("s3", marks=pytest.mark.s3)]
SETTINGS = {"image_size": 64, "split": "lesion"}
INPUTS = {"raw": "sha256:abc"}


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest) -> Store:
    name = "file_store" if request.param == "file" else "s3_store"
    return request.getfixturevalue(name).child("runs", "r1", "prepare")  # type: ignore[no-any-return]


class Recorder:
    """A Store wrapper that records the writes and deletes, in order."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.uri = inner.uri
        self.ops: list[tuple[str, str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def put_file(self, src: str | Path, key: str) -> str:
        self.ops.append(("put", key))
        return self.inner.put_file(src, key)

    def put_bytes(self, key: str, data: bytes) -> str:
        self.ops.append(("put", key))
        return self.inner.put_bytes(key, data)

    def put_files(self, items: Sequence[Upload], done: Any = None) -> list[str]:
        for _, key in items:
            self.ops.append(("put", key))
        return self.inner.put_files(items, done)

    def delete(self, key: str) -> None:
        self.ops.append(("delete", key))
        self.inner.delete(key)


def writer(files: Mapping[str, bytes], extra: Mapping[str, Any] | None = None) -> Any:
    """A stage body that writes `files` into its workdir; counts its calls."""

    def body(work: Path) -> Mapping[str, Any]:
        body.calls += 1  # type: ignore[attr-defined]
        for key, data in files.items():
            (work / key).parent.mkdir(parents=True, exist_ok=True)
            (work / key).write_bytes(data)
        return dict(extra or {})

    body.calls = 0  # type: ignore[attr-defined]
    return body


def keys(store: Store) -> list[str]:
    return [o.key for o in store.list()]


# --- fingerprint --------------------------------------------------------------------


def test_fingerprint_is_deterministic_and_sensitive() -> None:
    fp = fingerprint("prepare", {"a": 1, "b": [1, 2]}, {"raw": "x", "other": "y"})
    assert fp == fingerprint("prepare", {"b": [1, 2], "a": 1}, {"other": "y", "raw": "x"})
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert fp != fingerprint("augment", {"a": 1, "b": [1, 2]}, {"raw": "x", "other": "y"})
    assert fp != fingerprint("prepare", {"a": 2, "b": [1, 2]}, {"raw": "x", "other": "y"})
    assert fp != fingerprint("prepare", {"a": 1, "b": [2, 1]}, {"raw": "x", "other": "y"})
    assert fp != fingerprint("prepare", {"a": 1, "b": [1, 2]}, {"raw": "z", "other": "y"})


# --- commit -------------------------------------------------------------------------


def test_commit_uploads_outputs_then_manifest_last(store: Store) -> None:
    files = {"train-00000.tfrecord": b"t" * 1000, "plots/dist.png": b"png", "config.json": b"{}"}
    claim("prepare", store)  # an earlier attempt of this stage claimed the prefix
    rec = Recorder(store)
    rec.put_bytes(f"{STATE_PREFIX}/resume.json", b"{}")  # resume state of this attempt
    manifest = commit_stage("prepare", rec, SETTINGS, INPUTS, writer(files, {"counts": {"n": 3}}))  # type: ignore[arg-type]

    puts = [k for op, k in rec.ops if op == "put"]
    assert puts[-1] == MANIFEST  # the commit mark is the last write
    assert sorted(puts[1:-1]) == sorted(files)  # every output before it
    after = rec.ops[rec.ops.index(("put", MANIFEST)) + 1 :]
    assert after == [("delete", f"{STATE_PREFIX}/resume.json")]  # state is dropped after

    assert manifest == read_manifest(store) == get_json(store, MANIFEST)
    assert manifest["stage"] == "prepare"
    assert manifest["fingerprint"] == fingerprint("prepare", SETTINGS, INPUTS)
    assert manifest["settings"] == SETTINGS and manifest["inputs"] == INPUTS
    assert manifest["counts"] == {"n": 3}
    assert manifest["skinlesion_version"] == __version__
    assert manifest["files"] == {
        k: {"sha256": hashlib.sha256(v).hexdigest(), "size": len(v)} for k, v in files.items()
    }
    for key, data in files.items():
        assert store.get_bytes(key) == data
    assert sorted(keys(store)) == sorted([*files, MANIFEST, OWNER])
    assert is_done(store, manifest["fingerprint"])
    assert require_manifest(store, "prepared data") == manifest


def test_same_fingerprint_is_skipped_unless_forced(store: Store) -> None:
    body = writer({"out.bin": b"1"})
    first = commit_stage("prepare", store, SETTINGS, INPUTS, body)
    store.put_bytes(f"{STATE_PREFIX}/leftover", b"x")  # a crash between commit and clean-up
    again = commit_stage("prepare", store, dict(SETTINGS), dict(INPUTS), body)
    assert body.calls == 1
    assert again == first
    assert keys(store) == [MANIFEST, "out.bin", OWNER]  # the stale state is gone too
    forced = commit_stage("prepare", store, SETTINGS, INPUTS, body, force=True)
    assert body.calls == 2
    assert forced["fingerprint"] == first["fingerprint"]


@pytest.mark.parametrize(
    ("settings", "inputs"),
    [({**SETTINGS, "image_size": 96}, INPUTS), (SETTINGS, {"raw": "sha256:def"})],
    ids=["settings", "inputs"],
)
def test_changed_fingerprint_uncommits_then_clears_stale_objects(
    store: Store, settings: dict[str, Any], inputs: dict[str, str]
) -> None:
    old = commit_stage("prepare", store, SETTINGS, INPUTS, writer({"a.bin": b"a", "b.bin": b"b"}))
    store.put_bytes(f"{STATE_PREFIX}/old-resume", b"from the old settings")
    seen: dict[str, Any] = {}

    def body(work: Path) -> dict[str, Any]:
        seen["manifest"] = read_manifest(store)  # readers see nothing during the rerun
        seen["keys"] = keys(store)
        (work / "a.bin").write_bytes(b"new a")
        return {}

    new = commit_stage("prepare", store, settings, inputs, body)
    # The body (which validates the inputs) runs before anything is touched: readers
    # still see the old output; then it is uncommitted, cleared and replaced.
    assert seen["manifest"] == old
    assert new["fingerprint"] != old["fingerprint"]
    assert read_manifest(store) == new
    assert keys(store) == ["a.bin", MANIFEST, OWNER]
    assert store.get_bytes("a.bin") == b"new a"


def test_failing_body_leaves_no_manifest(store: Store) -> None:
    def body(work: Path) -> dict[str, Any]:
        (work / "half.bin").write_bytes(b"half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        commit_stage("prepare", store, SETTINGS, INPUTS, body)
    assert read_manifest(store) is None
    assert not is_done(store, fingerprint("prepare", SETTINGS, INPUTS))
    with pytest.raises(InputError, match=r"has no manifest\.json: run its stage first") as info:
        require_manifest(store, "prepared data")
    assert store.uri in str(info.value)


@pytest.mark.parametrize(
    ("files", "extra"),
    [
        ({MANIFEST: b'{"fingerprint": "fake"}'}, {}),
        ({f"{STATE_PREFIX}/x": b"x"}, {}),
        ({"ok.bin": b"1"}, {"fingerprint": "forged"}),
        ({"ok.bin": b"1"}, {"files": {}}),
    ],
    ids=["manifest-file", "state-file", "fingerprint-field", "files-field"],
)
def test_body_cannot_forge_the_commit_mark(
    file_store: Store, files: dict[str, bytes], extra: dict[str, Any]
) -> None:
    out = file_store.child("stage")
    with pytest.raises(StageFailed, match="reserved"):
        commit_stage("prepare", out, SETTINGS, INPUTS, writer(files, extra))
    assert read_manifest(out) is None
    assert keys(out) == []  # refused before anything was uploaded


def test_foreign_manifest_is_an_input_error(file_store: Store) -> None:
    put_json(file_store, MANIFEST, ["not", "a", "manifest"])
    with pytest.raises(InputError, match="not a stage manifest"):
        read_manifest(file_store)


# --- crash: SIGKILL a child process mid-body and mid-upload -------------------------

CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from skinlesion.manifest import commit_stage
    from skinlesion.storage import open_store

    uri, mode = sys.argv[1], sys.argv[2]
    out = open_store(uri)

    class Announcing:  # announces each upload; hangs after the second one
        def __init__(self, inner):
            self.inner, self.uri, self.count = inner, inner.uri, 0
        def __getattr__(self, name):
            return getattr(self.inner, name)
        def put_file(self, src, key):
            digest = self.inner.put_file(src, key)
            self.count += 1
            print(f"uploaded {key}", flush=True)
            if mode == "upload" and self.count == 2:
                time.sleep(120)
            return digest
        def put_files(self, items, done=None):
            return [self.put_file(src, key) for src, key in items]

    def body(work):
        out.put_bytes("state/resume.json", b'{"epoch": 3}')  # written as it goes
        for name in ("a.bin", "b.bin", "c.bin", "d.bin"):
            (work / name).write_bytes(name.encode() * 1000)
        print("body-wrote-files", flush=True)
        if mode == "body":
            time.sleep(120)
        return {"epochs_run": 4}

    commit_stage(
        "train", Announcing(out), {"lr": 0.1}, {"train_data": "fp"}, body, claim_first=True
    )
    print("committed", flush=True)
    """
)


def _run_until(uri: str, mode: str, marker: str) -> list[str]:
    """Start the child, SIGKILL it as soon as it prints `marker`; its output lines."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, uri, mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    watchdog = threading.Timer(60, proc.kill)  # never hang the test run
    watchdog.start()
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.strip())
            if line.strip() == marker:
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.wait(30)
    finally:
        watchdog.cancel()
        proc.kill()
    stderr = proc.stderr.read() if proc.stderr else ""
    assert proc.returncode == -signal.SIGKILL, f"child ended on its own: {lines}\n{stderr}"
    return lines


@pytest.fixture
def out_uri(store: Store) -> str:
    return store.child("train").uri


@pytest.mark.parametrize(
    ("mode", "marker", "uploaded"),
    [("body", "body-wrote-files", []), ("upload", "uploaded b.bin", ["a.bin", "b.bin"])],
)
def test_killed_stage_leaves_nothing_committed(
    out_uri: str, mode: str, marker: str, uploaded: list[str]
) -> None:
    lines = _run_until(out_uri, mode, marker)
    assert "committed" not in lines
    out = open_store(out_uri)
    # Nothing looks finished: no manifest, readers see nothing.
    assert read_manifest(out) is None
    assert not is_done(out, fingerprint("train", {"lr": 0.1}, {"train_data": "fp"}))
    with pytest.raises(InputError, match="run its stage first"):
        require_manifest(out, "model")
    # What the attempt got to write is there, resume state included.
    assert keys(out) == [*uploaded, OWNER, f"{STATE_PREFIX}/resume.json"]

    # The next attempt resumes from the state, then commits and drops it.
    seen: dict[str, Any] = {}

    def resume(work: Path) -> dict[str, Any]:
        seen["state"] = json.loads(out.get_bytes(f"{STATE_PREFIX}/resume.json"))
        seen["keys"] = keys(out)
        (work / "a.bin").write_bytes(b"final")
        return {}

    manifest = commit_stage(
        "train", out, {"lr": 0.1}, {"train_data": "fp"}, resume, claim_first=True
    )
    assert seen == {"state": {"epoch": 3}, "keys": [OWNER, f"{STATE_PREFIX}/resume.json"]}
    assert keys(out) == ["a.bin", MANIFEST, OWNER]  # partial outputs and state gone
    assert read_manifest(out) == manifest
    assert manifest["files"] == {
        "a.bin": {"sha256": hashlib.sha256(b"final").hexdigest(), "size": 5}
    }


def test_uncommitted_prefix_keeps_state_but_not_partial_outputs(store: Store) -> None:
    """Without a crash child: an uncommitted own prefix is cleared except `state/`."""
    claim("train", store)
    store.put_bytes("partial.bin", b"p")
    store.put_bytes(f"{STATE_PREFIX}/ckpt/weights.h5", b"w")
    observed: list[list[ObjectInfo]] = []

    def body(work: Path) -> dict[str, Any]:
        observed.append(store.list())
        (work / "final.bin").write_bytes(b"f")
        return {}

    commit_stage("train", store, {}, {}, body, claim_first=True)
    assert [o.key for o in observed[0]] == [OWNER, f"{STATE_PREFIX}/ckpt/weights.h5"]
    assert keys(store) == ["final.bin", MANIFEST, OWNER]
