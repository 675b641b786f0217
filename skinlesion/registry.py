"""The versioned model registry under `<store>/models/` (layout.py).

Every promotion writes a new version `versions/<n>/` (claimed with put_bytes_if_absent on
its owner.json, files uploaded, manifest.json last; never rewritten), then moves the
`champion` alias in `registry.json` by compare-and-swap (the old champion becomes
`previous`), then copies the champion version to `models/latest` for existing readers.
The registry is the truth; `latest` is its copy, resynced after every alias move, by one
writer at a time (the lock object `models/lock.json`, runlock.py): two promoters copying
at once would leave one's manifest over the other's files.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from skinlesion import logs, runlock
from skinlesion.errors import InputError, StoreError
from skinlesion.layout import (
    LATEST_KEY,
    REGISTRY_FILE,
    VERSIONS,
    serving_key,
    sibling_stage_uri,
    version_key,
)
from skinlesion.manifest import (
    MANIFEST,
    OWNER,
    VERSION_FIELD,
    claim,
    clear,
    publish,
    read_manifest,
)
from skinlesion.results import SCHEMA_VERSION, ChampionResult, parse_result
from skinlesion.scratch import scratch_dir
from skinlesion.serving import publish_export
from skinlesion.storage import Store, download_prefix, get_json, open_store

IMAGE_TAG_ENV = "SKINLESION_IMAGE_TAG"
CHAMPION_ALIAS, PREVIOUS_ALIAS = "champion", "previous"
MAX_TRIES = 50  # compare-and-swap retries before giving up on a hot registry
LATEST_WRITER = "latest"  # the holder name in models/lock.json while `latest` is rewritten
LATEST_WAIT_S = 600.0  # how long a promoter waits for another one's copy to `latest`


def models_of_champion(target: Store) -> Store:
    """The registry prefix of a champion prefix: its parent (`models/latest` -> `models`)."""
    uri = sibling_stage_uri(target.uri, "x")
    if uri is None:
        raise InputError(f"--target {target.uri}: the champion prefix needs a parent (…/models)")
    return open_store(uri.rsplit("/", 1)[0])


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _encode(registry: dict[str, Any]) -> bytes:
    return json.dumps(registry, indent=2, sort_keys=True).encode() + b"\n"


def read_raw(models: Store) -> tuple[bytes | None, dict[str, Any]]:
    """(the exact bytes for a compare-and-swap or None, the parsed registry)."""
    if not models.exists(REGISTRY_FILE):
        return None, {"versions": [], "aliases": {}, "history": []}
    raw = models.get_bytes(REGISTRY_FILE)
    try:
        registry = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InputError(f"{models.uri}/{REGISTRY_FILE}: invalid JSON: {exc}") from None
    return raw, registry


def _swap(models: Store, raw: bytes | None, registry: dict[str, Any]) -> bool:
    data = _encode(registry)
    if raw is None:
        return models.put_bytes_if_absent(REGISTRY_FILE, data)
    return models.swap_bytes(REGISTRY_FILE, raw, data)


def entry(registry: dict[str, Any], n: int) -> dict[str, Any]:
    for e in registry["versions"]:
        if e["version"] == n:
            return dict(e)
    raise InputError(f"N: no model version {n} in the registry")


def aliases_of(registry: dict[str, Any], n: int) -> list[str]:
    return sorted(a for a, v in registry["aliases"].items() if v == n)


def champion(models: Store) -> tuple[int, ChampionResult, Store] | None:
    """(version, its manifest, its prefix) of the `champion` alias, or None."""
    _, registry = read_raw(models)
    n = registry["aliases"].get(CHAMPION_ALIAS)
    return None if n is None else _version(models, n)


def replaced_by(models: Store, n: int) -> tuple[int, ChampionResult, Store] | None:
    """The champion that version n replaced when it was promoted (None: there was none)."""
    _, registry = read_raw(models)
    moves = [h for h in registry["history"] if h["action"] == "promote" and h["champion"] == n]
    before = moves[-1]["from"] if moves else None
    return None if before is None else _version(models, before)


def _version(models: Store, n: int) -> tuple[int, ChampionResult, Store]:
    store = models.child(version_key(n))
    manifest = read_manifest(store)
    if manifest is None:
        raise InputError(f"{store.uri}: the champion version has no {MANIFEST}")
    return n, parse_result(ChampionResult, manifest, f"{store.uri}/{MANIFEST}"), store


def champion_of(target: Store) -> tuple[int | None, ChampionResult, Store] | None:
    """(version, manifest, prefix) of the champion, read through the registry next to the
    champion prefix `target`; a champion written before the registry existed is read from
    `target` (version None)."""
    found = champion(models_of_champion(target))
    if found is not None:
        return found
    manifest = read_manifest(target)
    if manifest is None:
        return None
    return None, parse_result(ChampionResult, manifest, f"champion {target.uri}/{MANIFEST}"), target


def lineage(candidate: Store, manifests: list[dict[str, Any]]) -> dict[str, str]:
    """stage -> fingerprint: the upstream outputs the `manifests` were built from (while
    they still hold what was read), then the other committed stages of the candidate's
    run (`runs/<id>/<stage>`, the siblings of the evaluate prefix)."""
    from skinlesion.lineage import upstream
    from skinlesion.stages import STAGES

    found: dict[str, str] = {}
    todo = list(manifests)
    while todo:
        current = todo.pop()
        found.setdefault(current["stage"], current["fingerprint"])
        for name in sorted(current.get("sources") or {}):
            up = upstream(current, name)
            if up is not None and up[1]["stage"] not in found:
                todo.append(up[1])
    for stage in STAGES:
        uri = sibling_stage_uri(candidate.uri, stage.name)
        if stage.name in found or stage.name == "promote" or uri is None:
            continue
        manifest = read_manifest(open_store(uri))
        if manifest is not None:
            found[stage.name] = manifest["fingerprint"]
    return dict(sorted(found.items()))


def _unlisted_claim(models: Store, registry: dict[str, Any], run_id: str) -> int | None:
    """A version this run claimed but never listed (its promotion was killed before the
    registry named it: no reader knows it), to be reused instead of left half-written."""
    listed = {e["version"] for e in registry["versions"]}
    for obj in models.list(VERSIONS):
        n_text, _, name = obj.key.removeprefix(f"{VERSIONS}/").partition("/")
        if name != OWNER or not n_text.isdigit() or int(n_text) in listed:
            continue
        mark = get_json(models, obj.key)
        if isinstance(mark, dict) and mark.get("run_id") == run_id:
            return int(n_text)
    return None


def _claim_version(models: Store, registry: dict[str, Any], run_id: str) -> int:
    """The next free version number, claimed: exactly one claimer wins each n. A version
    this run claimed before without listing it is cleared and reused (one writer per run:
    the run lock)."""
    mine = _unlisted_claim(models, registry, run_id)
    if mine is not None:
        clear(models.child(version_key(mine)), keep_state=False)
        logs.get().warning("version_reclaimed", version=mine, reason="an earlier attempt stopped")
        return mine
    n = max((e["version"] for e in registry["versions"]), default=0) + 1
    owner = {"run_id": run_id, "pid": os.getpid(), "created_at": _now()}
    while not models.put_bytes_if_absent(
        f"{version_key(n)}/{OWNER}", json.dumps({**owner, "version": n}).encode()
    ):
        n += 1
    return n


@dataclass(frozen=True)
class Registered:
    version: int
    champion: bool
    reason: str  # why not the champion (empty when it is)


Redecide = Callable[[int, ChampionResult, Store], tuple[bool, str]]


def register(
    models: Store,
    work: Path,
    fields: dict[str, Any],
    stages: dict[str, str],
    compared_with: int | None,
    redecide: Redecide,
    serving: tuple[Path, dict[str, Any]] | None = None,
) -> Registered:
    """Commit `work`'s files as a new version (and `serving`'s SavedModel directory and
    manifest fields as its serving export) and make it the champion, unless another
    promoter moved the champion since the decision (`compared_with`) and `redecide`
    against the new one says no: then the version is listed without an alias."""
    _, registry = read_raw(models)
    result = parse_result(
        ChampionResult, {**fields, VERSION_FIELD: SCHEMA_VERSION}, "registry entry"
    )  # checks the fields before anything is written
    n = _claim_version(models, registry, result.run_id)
    publish(models.child(version_key(n)), work, {**fields, "version": n}, "champion")
    if serving is not None:  # committed before any alias can name the version
        publish_export(models.child(serving_key(n)), serving[0], {**serving[1], "version": n})
    record = {
        "version": n,
        "run_id": result.run_id,
        "stages": stages,
        "data_fingerprint": stages.get("prepare", result.val_data_fingerprint),
        "model_sha256": result.model_sha256,
        "metric": result.metric,
        "metric_value": result.metric_value,
        "metrics": result.metrics,
        "backbone": result.backbone,
        "image_size": result.image_size,
        "created_at": _now(),
        "image_tag": os.environ.get(IMAGE_TAG_ENV, ""),
        "serving": serving_key(n) if serving is not None else None,  # under models/
    }
    expected, reason = compared_with, ""
    for _ in range(MAX_TRIES):
        raw, registry = read_raw(models)
        current = registry["aliases"].get(CHAMPION_ALIAS)
        if current != expected and current is not None:
            now = champion(models)
            assert now is not None
            wins, why = redecide(*now)
            if not wins:
                reason = f"lost the race: version {current} became the champion meanwhile; {why}"
            expected = current
        new = {**registry, "versions": [*registry["versions"], record]}
        if not reason:
            new["aliases"] = _moved(registry["aliases"], n)
            new["history"] = [*registry["history"], _event("promote", n, current, result.run_id)]
        if _swap(models, raw, new):
            break
    else:
        raise InputError(f"{models.uri}/{REGISTRY_FILE}: too many concurrent updates, retry")
    logs.get().info("model_registered", version=n, champion=not reason, reason=reason)
    if not reason:
        sync_latest(models)
    return Registered(n, not reason, reason)


def _moved(aliases: dict[str, int], n: int) -> dict[str, int]:
    moved = {**aliases, CHAMPION_ALIAS: n}
    old = aliases.get(CHAMPION_ALIAS)
    if old is not None and old != n:
        moved[PREVIOUS_ALIAS] = old
    return moved


def _event(action: str, n: int, before: int | None, run_id: str | None) -> dict[str, Any]:
    return {"action": action, "champion": n, "from": before, "run_id": run_id, "at": _now()}


def rollback(models: Store, to: int | None = None) -> dict[str, Any]:
    """Move `champion` to `previous` (or to version `to`); the old champion becomes
    `previous`. Recorded in the history; `models/latest` follows. Returns the event."""
    for _ in range(MAX_TRIES):
        raw, registry = read_raw(models)
        aliases = registry["aliases"]
        current = aliases.get(CHAMPION_ALIAS)
        target = to if to is not None else aliases.get(PREVIOUS_ALIAS)
        if target is None:
            raise InputError("rollback: no previous champion; name a version with --to N")
        entry(registry, target)
        if target == current:
            raise InputError(f"--to: version {target} is already the champion")
        event = _event("rollback", target, current, None)
        new = {**registry, "aliases": _moved(aliases, target)}
        new["history"] = [*registry["history"], event]
        if raw is not None and _swap(models, raw, new):
            sync_latest(models)
            logs.get().info("model_rollback", version=target, previous=current)
            return event
    raise InputError(f"{models.uri}/{REGISTRY_FILE}: too many concurrent updates, retry")


@contextmanager
def _latest_writer(models: Store) -> Iterator[None]:
    """Hold the lock of `latest`'s writer, waiting while another promoter holds it (a
    dead holder's lock is taken over: runlock.py)."""
    lock = runlock.RunLock(models, LATEST_WRITER)
    deadline = time.monotonic() + LATEST_WAIT_S
    while True:
        try:
            lock.acquire()
            break
        except runlock.RunLocked as exc:
            if time.monotonic() > deadline:
                raise StoreError(f"{models.uri}: {LATEST_KEY} is being rewritten: {exc}") from None
            time.sleep(0.2)
    lock.start_heartbeat()
    try:
        yield
    finally:
        lock.release()


def sync_latest(models: Store) -> None:
    """Copy the champion version to `latest` (commit protocol: manifest removed first,
    written last) until `latest` holds what the registry names, also after a race."""
    with _latest_writer(models):
        _copy_champion(models)


def _copy_champion(models: Store) -> None:
    latest = models.child(LATEST_KEY)
    for _ in range(MAX_TRIES):
        now = champion(models)
        if now is None:
            return
        n, _, version = now
        held = read_manifest(latest)
        if held is not None and held.get("version") == n:
            return
        manifest = get_json(version, MANIFEST)
        with scratch_dir("skinlesion-registry-") as work:
            items = [(key, work / key) for key in manifest["files"]]
            with logs.Progress(f"copy of version {n} to latest", len(items), "file") as bar:
                version.get_files(items, lambda _: bar.update())
            claim("champion", latest)
            clear(latest, keep_state=False)
            fields = {k: v for k, v in manifest.items() if k not in ("files", VERSION_FIELD)}
            publish(latest, work, fields, "champion")


def export(models: Store, n: int, out: Path) -> list[Path]:
    """Copy version n's files (and its serving export, when there is one) into `out`."""
    _, registry = read_raw(models)
    entry(registry, n)
    paths = download_prefix(models, version_key(n), out)
    if models.list(serving_key(n)):
        paths += download_prefix(models, serving_key(n), out / "serving")
    return paths
