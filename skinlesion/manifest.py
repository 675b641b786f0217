"""The commit protocol every stage follows.

A stage writes its outputs under its prefix, then `manifest.json` last. A
prefix without a manifest does not exist for readers. The manifest holds the
stage's fingerprint (settings + input fingerprints), so a rerun with the same
inputs and settings is skipped, and a changed one clears the stale prefix
before writing.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from skinlesion import __version__, logs
from skinlesion.errors import InputError, StageFailed
from skinlesion.storage import Store, get_json, put_json

MANIFEST = "manifest.json"
# Objects under this sub-prefix survive an uncommitted restart (training resume state).
STATE_PREFIX = "state"
_PROTOCOL_FIELDS = frozenset(
    {"stage", "fingerprint", "settings", "inputs", "files", "created_at", "skinlesion_version"}
)


def fingerprint(stage: str, settings: Mapping[str, Any], inputs: Mapping[str, str]) -> str:
    """Deterministic id of a stage's work: its name, settings and input fingerprints."""
    payload = json.dumps(
        {"stage": stage, "settings": settings, "inputs": dict(inputs)},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def read_manifest(store: Store) -> dict[str, Any] | None:
    """The committed manifest of a stage prefix, or None when it is not committed."""
    if not store.exists(MANIFEST):
        return None
    manifest = get_json(store, MANIFEST)
    if not isinstance(manifest, dict) or "fingerprint" not in manifest:
        raise InputError(f"{store.uri}/{MANIFEST}: not a stage manifest")
    return manifest


def require_manifest(store: Store, what: str) -> dict[str, Any]:
    """The manifest of an input prefix; a clear error when its stage has not finished."""
    manifest = read_manifest(store)
    if manifest is None:
        raise InputError(f"{what} {store.uri} has no {MANIFEST}: run its stage first")
    return manifest


def is_done(store: Store, expected: str) -> bool:
    manifest = read_manifest(store)
    return manifest is not None and manifest.get("fingerprint") == expected


def clear(store: Store, keep_state: bool) -> None:
    """Remove the manifest first (uncommit), then every other object of the prefix."""
    store.delete(MANIFEST)
    for obj in store.list():
        if keep_state and obj.key.startswith(f"{STATE_PREFIX}/"):
            continue
        store.delete(obj.key)


def commit_stage(
    stage: str,
    out: Store,
    settings: Mapping[str, Any],
    inputs: Mapping[str, str],
    body: Callable[[Path], Mapping[str, Any]],
    force: bool = False,
) -> dict[str, Any]:
    """Run `body(workdir)` unless already done, upload what it wrote, commit the manifest.

    `body` writes its output files into `workdir` and returns extra manifest fields
    (counts, figures). Returns the committed manifest (the old one when skipped).
    """
    log = logs.get()
    fp = fingerprint(stage, settings, inputs)
    existing = read_manifest(out)
    if existing is not None and existing.get("fingerprint") == fp and not force:
        log.info("stage_already_done", out=out.uri, fingerprint=fp[:12])
        _drop_state(out)  # left behind if a crash came between commit and clean-up
        return existing
    # A committed prefix with other settings/inputs is stale: uncommit, then clear.
    # An uncommitted prefix is a crashed attempt: keep its resume state.
    clear(out, keep_state=existing is None and not force)
    scratch = os.environ.get("SKINLESION_SCRATCH") or None
    with tempfile.TemporaryDirectory(prefix=f"skinlesion-{stage}-", dir=scratch) as tmp:
        work = Path(tmp)
        extra = dict(body(work))
        clash = sorted(set(extra) & _PROTOCOL_FIELDS)
        if clash:  # would silently replace the fingerprint, the file list, ...
            raise StageFailed(stage, f"manifest fields {clash} are reserved for the protocol")
        files: dict[str, dict[str, Any]] = {}
        paths = sorted(p for p in work.rglob("*") if p.is_file())
        for path in paths:
            key = path.relative_to(work).as_posix()
            if key == MANIFEST or key.startswith(f"{STATE_PREFIX}/"):
                # manifest.json would be a premature commit mark; state/ is deleted at commit.
                raise StageFailed(
                    stage, f"output '{key}' uses a reserved name ({MANIFEST}, {STATE_PREFIX}/)"
                )
        for path in paths:
            key = path.relative_to(work).as_posix()
            files[key] = {"sha256": out.put_file(path, key), "size": path.stat().st_size}
    manifest = {
        "stage": stage,
        "fingerprint": fp,
        "settings": dict(settings),
        "inputs": dict(inputs),
        "files": files,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "skinlesion_version": __version__,
        **extra,
    }
    put_json(out, MANIFEST, manifest)  # the commit mark, written last
    _drop_state(out)
    return manifest


def _drop_state(out: Store) -> None:
    """Resume state is useless once the stage is committed."""
    for obj in out.list(STATE_PREFIX):
        out.delete(obj.key)
