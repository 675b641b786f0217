"""The commit protocol every stage follows.

A stage writes its outputs under its prefix, then `manifest.json` last. A
prefix without a manifest does not exist for readers. The manifest holds the
stage's fingerprint (settings + input fingerprints), so a rerun with the same
inputs and settings is skipped, and a changed one clears the stale prefix
before writing.

Ownership: a stage deletes only what it can prove it wrote. Before its first write
to a prefix it puts an owner mark there (`owner.json`: stage, run id, host, pid,
time); a non-empty prefix without the stage's own mark, or with another stage's, is
refused (InputError, exit 2) and left untouched. A prefix that already holds a
committed manifest of the same stage but no mark (written before marks existed) is
adopted. An output prefix that equals, contains or lies inside one of the stage's
input prefixes is refused as well. Inputs are validated before anything is written:
the body runs first (into a local directory), the prefix is claimed and cleared
after it succeeded; only a stage that keeps resume state in the store while it runs
(training) claims its prefix before its body.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from skinlesion import __version__, faults, logs
from skinlesion.errors import InputError, StageFailed
from skinlesion.results import SCHEMA_VERSION, VERSION_FIELD, R, Result, parse_result
from skinlesion.scratch import scratch_dir
from skinlesion.storage import Store, get_json, open_store, put_json
from skinlesion.storage.base import Upload

MANIFEST = "manifest.json"
OWNER = "owner.json"  # the owner mark, written before a stage's first write to a prefix
# Objects under this sub-prefix survive an uncommitted restart (training resume state).
STATE_PREFIX = "state"
_PROTOCOL_FIELDS = frozenset(
    {
        "stage",
        "fingerprint",
        "settings",
        "inputs",
        "sources",
        "started_at",
        "files",
        "created_at",
        "skinlesion_version",
        VERSION_FIELD,
    }
)
_RESERVED = (MANIFEST, OWNER)  # keys a stage body may not write


def fingerprint(stage: str, settings: Mapping[str, Any], inputs: Mapping[str, str]) -> str:
    """Deterministic id of a stage's work: its name, settings and input fingerprints."""
    payload = json.dumps(
        {"stage": stage, "settings": settings, "inputs": dict(inputs)},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def stage_input_fingerprint(manifest: Mapping[str, Any]) -> str:
    """What a downstream stage records for an upstream stage prefix it reads.

    The upstream fingerprint says which work produced the prefix; the sha256 of each
    committed file says which bytes it holds. Two writes of the same work (two runs
    at once, a retrained model) differ in bytes, so a changed file under an unchanged
    fingerprint never counts as the same input.
    """
    files = manifest.get("files") or {}
    payload = json.dumps(
        {
            "fingerprint": manifest["fingerprint"],
            "files": {key: (files[key] or {}).get("sha256") for key in sorted(files)},
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def input_fingerprints(inputs: Mapping[str, str]) -> dict[str, str]:
    """Fingerprint of each input: a HAM10000 tree's content listing, or a stage manifest
    (`stage_input_fingerprint`)."""
    from skinlesion.ham10000 import raw_fingerprint

    out = {}
    for name, uri in inputs.items():
        store = open_store(uri)
        out[name] = (
            raw_fingerprint(store)
            if name == "raw"
            else stage_input_fingerprint(require_manifest(store, name))
        )
    return out


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


def read_result(store: Store, cls: type[R], what: str) -> tuple[dict[str, Any], R]:
    """(manifest, its typed body) of an input prefix."""
    manifest = require_manifest(store, what)
    return manifest, parse_result(cls, manifest, f"{what} {store.uri}/{MANIFEST}")


def _current(manifest: Mapping[str, Any] | None, expected: str) -> bool:
    """Committed with this fingerprint by this manifest schema (older ones are redone)."""
    return (
        manifest is not None
        and manifest.get("fingerprint") == expected
        and manifest.get(VERSION_FIELD) == SCHEMA_VERSION
    )


def is_done(store: Store, expected: str) -> bool:
    return _current(read_manifest(store), expected)


def clear(store: Store, keep_state: bool) -> None:
    """Remove the manifest first (uncommit), then every other object of the prefix but
    its owner mark. Only for a prefix this stage owns (`claim`)."""
    store.delete(MANIFEST)
    for obj in store.list():
        if obj.key == OWNER or (keep_state and obj.key.startswith(f"{STATE_PREFIX}/")):
            continue
        store.delete(obj.key)


# --- ownership ------------------------------------------------------------------------------


def _location(uri: str) -> tuple[str, str, tuple[str, ...]]:
    """(scheme, bucket, path segments) of a store URI, for prefix comparisons."""
    parsed = urlparse(uri)
    scheme = parsed.scheme or "file"
    path = unquote(parsed.path) if parsed.scheme else uri
    if scheme == "file":
        path = os.path.realpath(path)
    return scheme, parsed.netloc if scheme == "s3" else "", tuple(p for p in path.split("/") if p)


def check_disjoint(stage: str, out_uri: str, inputs: Mapping[str, str]) -> None:
    """Refuse an output prefix that equals, contains or lies inside an input prefix."""
    out = _location(out_uri)
    for name, uri in inputs.items():
        other = _location(uri)
        if out[:2] != other[:2]:
            continue
        shorter = min(len(out[2]), len(other[2]))
        if out[2][:shorter] == other[2][:shorter]:
            how = (
                "is"
                if out == other
                else ("contains" if len(out[2]) < len(other[2]) else "lies inside")
            )
            raise InputError(
                f"output prefix {out_uri} {how} the {name} input {uri}: "
                f"the {stage} stage would overwrite its own input; choose another output"
            )


def read_owner(store: Store) -> dict[str, Any] | None:
    if not store.exists(OWNER):
        return None
    mark = get_json(store, OWNER)
    if not isinstance(mark, dict) or "stage" not in mark:
        raise InputError(f"{store.uri}/{OWNER}: not an owner mark")
    return mark


def check_owned(stage: str, out: Store) -> bool:
    """Whether `stage` may write `out`: True when the prefix is its own (marked, or an
    unmarked committed output of the same stage), False when it is empty; InputError
    naming the prefix when it holds anything else."""
    mark = read_owner(out)
    if mark is not None:
        if mark["stage"] != stage:
            raise InputError(
                f"{out.uri} holds the output of stage '{mark['stage']}' (run "
                f"{mark.get('run_id', '?')}); the {stage} stage will not write there: "
                "choose another output prefix"
            )
        return True
    if not out.list():
        return False
    manifest = _manifest_or_none(out)
    if manifest is not None and manifest.get("stage") == stage:
        return True  # committed before owner marks existed: adopted
    raise InputError(
        f"{out.uri} is not empty and was not written by the {stage} stage (no {OWNER}): "
        "refusing to delete or overwrite it; choose an empty or new output prefix"
    )


def _manifest_or_none(store: Store) -> dict[str, Any] | None:
    try:
        return read_manifest(store)
    except InputError:
        return None  # not a stage manifest: foreign data


def claim(stage: str, out: Store) -> None:
    """Mark `out` as `stage`'s own (once checked with `check_owned`)."""
    if read_owner(out) is None:
        ctx = logs.context()
        put_json(
            out,
            OWNER,
            {
                "stage": stage,
                "run_id": ctx.get("run_id"),
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            },
        )


def _outputs(work: Path, what: str) -> list[Path]:
    """The files a body wrote; StageFailed when one uses a reserved name."""
    paths = sorted(p for p in work.rglob("*") if p.is_file())
    for path in paths:
        key = path.relative_to(work).as_posix()
        if key in _RESERVED or key.startswith(f"{STATE_PREFIX}/"):
            # manifest.json would be a premature commit mark; state/ is deleted at commit.
            raise StageFailed(
                what, f"output '{key}' uses a reserved name ({', '.join(_RESERVED)}, state/)"
            )
    return paths


def publish(
    out: Store, work: Path, manifest: Mapping[str, Any], what: str, last: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Upload every file of `work` to the claimed, cleared `out` (several at once on S3;
    the keys in `last` after all the others, for readers that poll for one file), then
    the manifest (plus the file list) last: the commit mark."""
    files: dict[str, dict[str, Any]] = {}
    items = [(path, path.relative_to(work).as_posix()) for path in _outputs(work, what)]
    sizes = {key: path.stat().st_size for path, key in items}
    with logs.Progress(f"{what} upload", sum(sizes.values()), "B") as bar:

        def done(item: Upload) -> None:
            bar.update(sizes[item[1]])

        for batch in (
            [item for item in items if item[1] not in last],
            [item for item in items if item[1] in last],
        ):
            for (_, key), digest in zip(batch, out.put_files(batch, done), strict=True):
                files[key] = {"sha256": digest, "size": sizes[key]}
    committed = {**manifest, VERSION_FIELD: SCHEMA_VERSION, "files": files}
    put_json(out, MANIFEST, committed)  # the commit mark, written last
    return committed


def commit_stage(
    stage: str,
    out: Store,
    settings: Mapping[str, Any],
    inputs: Mapping[str, str],
    body: Callable[[Path], Result | Mapping[str, Any]],
    force: bool = False,
    input_uris: Mapping[str, str] | None = None,
    claim_first: bool = False,
) -> dict[str, Any]:
    """Run `body(workdir)` unless already done, upload what it wrote, commit the manifest.

    `body` writes its output files into `workdir` and returns extra manifest fields
    (counts, figures). `input_uris` (name -> prefix) are refused as outputs. With
    `claim_first` (a body that keeps resume state under `out/state/`) the prefix is
    claimed and cleared before the body, else after it. Returns the committed manifest
    (the old one when skipped).
    """
    log = logs.get()
    check_disjoint(stage, out.uri, input_uris or {})
    started = datetime.now(UTC).isoformat(timespec="seconds")
    fp = fingerprint(stage, settings, inputs)
    existing = _manifest_or_none(out)
    if existing is not None and _current(existing, fp) and not force:
        log.info("stage_already_done", out=out.uri, fingerprint=fp[:12])
        drop_state(out)  # left behind if a crash came between commit and clean-up
        return existing
    check_owned(stage, out)  # read-only: refuses foreign data before anything is written

    def take() -> None:
        claim(stage, out)
        # A committed prefix with other settings/inputs (or --force) is stale: uncommit,
        # clear. An uncommitted own prefix is a crashed attempt: keep its resume state.
        clear(out, keep_state=existing is None and not force)
        faults.point("commit.claimed")

    if claim_first:
        take()
    with scratch_dir(f"skinlesion-{stage}-") as work:
        result = body(work)
        extra = result.to_manifest() if isinstance(result, Result) else dict(result)
        clash = sorted(set(extra) & _PROTOCOL_FIELDS)
        if clash:  # would silently replace the fingerprint, the file list, ...
            raise StageFailed(stage, f"manifest fields {clash} are reserved for the protocol")
        _outputs(work, stage)  # refuse reserved names before anything is written
        if not claim_first:
            take()
        manifest = publish(
            out,
            work,
            {
                "stage": stage,
                "fingerprint": fp,
                "settings": dict(settings),
                "inputs": dict(inputs),
                "sources": dict(input_uris or {}),  # where each input was read (lineage)
                "started_at": started,  # this attempt's start (runs show: durations)
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "skinlesion_version": __version__,
                **extra,
            },
            stage,
        )
    faults.point("commit.manifest")
    drop_state(out)
    return manifest


def drop_state(out: Store) -> None:
    """Resume state is useless once the stage is committed."""
    for obj in out.list(STATE_PREFIX):
        out.delete(obj.key)
