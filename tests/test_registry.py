"""The model registry on both stores: each promotion is a new version with its lineage,
the aliases move (champion, previous), rollback moves them back, models/latest follows,
and two promoters racing never both become the champion."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest

from skinlesion import promote, registry
from skinlesion.errors import InputError
from skinlesion.layout import MODELS, REGISTRY_FILE, models_uri, serving_key, version_key
from skinlesion.manifest import MANIFEST, OWNER, read_manifest
from skinlesion.promote import run_promote
from skinlesion.storage import Store, open_store, sha256_bytes
from tests.test_promote import CFG, make_candidate

BACKENDS = ["file", pytest.param("s3", marks=pytest.mark.s3)]


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest) -> Store:
    name = "file_store" if request.param == "file" else "s3_store"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


def promote_run(store: Store, run_id: str, balanced: float) -> tuple[dict[str, Any], bytes]:
    evaluation, model, blob = make_candidate(store, run_id, balanced, 0.5)
    manifest = run_promote(CFG, evaluation, model, store.child("models", "latest"), run_id)
    return manifest["decision"], blob


def _registry(store: Store) -> dict[str, Any]:
    return registry.read_raw(store.child("models"))[1]


def test_promotions_are_versions_with_lineage(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(registry.IMAGE_TAG_ENV, "skinlesion:1.2.3")
    first, blob1 = promote_run(store, "r1", 0.60)
    monkeypatch.delenv(registry.IMAGE_TAG_ENV)
    second, blob2 = promote_run(store, "r2", 0.70)
    worse, _ = promote_run(store, "r3", 0.50)
    assert (first["version"], second["version"]) == (1, 2)
    assert worse["promoted"] is False and worse["version"] is None  # no version for a loser
    assert second["champion"]["version"] == 1
    reg = _registry(store)
    assert reg["aliases"] == {"champion": 2, "previous": 1}
    assert [e["version"] for e in reg["versions"]] == [1, 2]
    one, two = reg["versions"]
    assert (one["image_tag"], two["image_tag"]) == ("skinlesion:1.2.3", "")
    run = store.child("runs", "r1")
    for stage in ("prepare", "train", "evaluate"):
        manifest = read_manifest(run.child(stage))
        assert manifest is not None and one["stages"][stage] == manifest["fingerprint"]
    assert one["data_fingerprint"] == one["stages"]["prepare"]
    assert one["run_id"] == "r1" and one["metric_value"] == 0.60 and two["metric_value"] == 0.70
    assert one["backbone"] and one["image_size"] > 0 and one["created_at"]
    models = store.child("models")
    assert models.get_bytes(f"{version_key(1)}/model.keras") == blob1  # immutable
    assert models.get_bytes(f"{version_key(2)}/model.keras") == blob2
    latest = store.child("models", "latest")
    assert latest.get_bytes("model.keras") == blob2
    held = read_manifest(latest)
    assert held is not None and held["version"] == 2 and held["run_id"] == "r2"
    assert [h["action"] for h in reg["history"]] == ["promote", "promote"]


def test_rollback_moves_the_aliases_and_latest(store: Store) -> None:
    models = store.child("models")
    with pytest.raises(InputError, match="no previous champion"):
        registry.rollback(models)
    _, blob1 = promote_run(store, "r1", 0.60)
    _, blob2 = promote_run(store, "r2", 0.70)
    event = registry.rollback(models)
    assert (event["champion"], event["from"]) == (1, 2)
    reg = _registry(store)
    assert reg["aliases"] == {"champion": 1, "previous": 2}
    assert reg["history"][-1]["action"] == "rollback"
    assert store.child("models", "latest").get_bytes("model.keras") == blob1
    # The champion is read through the registry: 0.65 beats version 1 (0.60), not 2 (0.70).
    decision, blob3 = promote_run(store, "r3", 0.65)
    assert decision["promoted"] is True and decision["champion"]["version"] == 1
    assert _registry(store)["aliases"] == {"champion": 3, "previous": 1}
    registry.rollback(models, to=2)
    assert _registry(store)["aliases"] == {"champion": 2, "previous": 3}
    assert store.child("models", "latest").get_bytes("model.keras") == blob2
    with pytest.raises(InputError, match="no model version 9"):
        registry.rollback(models, to=9)
    with pytest.raises(InputError, match="already the champion"):
        registry.rollback(models, to=2)
    assert blob3 == models.get_bytes(f"{version_key(3)}/model.keras")


@pytest.mark.parametrize(("balanced", "wins"), [(0.60, False), (0.70, True)])
def test_a_stale_decision_is_checked_again_against_the_new_champion(
    store: Store, monkeypatch: pytest.MonkeyPatch, balanced: float, wins: bool
) -> None:
    """r2 decided while there was no champion; r1 won meanwhile: r2 gets version 2 and is
    the champion only if it also beats r1."""
    promote_run(store, "r1", 0.60)
    monkeypatch.setattr(promote, "_champion", lambda target: None)  # the stale read
    decision, blob = promote_run(store, "r2", balanced)
    reg = _registry(store)
    assert decision["version"] == 2 and [e["version"] for e in reg["versions"]] == [1, 2]
    assert decision["promoted"] is wins
    assert reg["aliases"]["champion"] == (2 if wins else 1)
    latest = store.child("models", "latest")
    assert (latest.get_bytes("model.keras") == blob) is wins
    if not wins:
        assert decision["reason"].startswith("lost the race: version 1 became the champion")


def test_racing_promoters_make_one_champion(store: Store) -> None:
    """Equal candidates promoted at once: exactly one is the champion; the other either
    saw it (no version) or lost the alias race (a listed version without an alias)."""
    runs = {r: make_candidate(store, r, 0.60, 0.5) for r in ("r1", "r2")}
    decisions: dict[str, dict[str, Any]] = {}
    barrier = threading.Barrier(2)

    def go(run_id: str) -> None:
        evaluation, model, _ = runs[run_id]
        barrier.wait()
        manifest = run_promote(CFG, evaluation, model, store.child("models", "latest"), run_id)
        decisions[run_id] = manifest["decision"]

    threads = [threading.Thread(target=go, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(decisions) == 2
    winners = [r for r, d in decisions.items() if d["promoted"]]
    assert len(winners) == 1
    reg = _registry(store)
    champ = reg["aliases"]["champion"]
    assert decisions[winners[0]]["version"] == champ
    loser = decisions[next(r for r in runs if r not in winners)]
    listed = sorted(e["version"] for e in reg["versions"])
    assert listed == ([1, 2] if loser["version"] else [1])
    if loser["version"]:
        assert loser["version"] != champ and loser["reason"].startswith("lost the race")
    latest = store.child("models", "latest")
    assert latest.get_bytes("model.keras") == runs[winners[0]][2]
    held = read_manifest(latest)
    assert held is not None and held["version"] == champ


def test_export_copies_the_version_files(store: Store, tmp_path: Any) -> None:
    _, blob = promote_run(store, "r1", 0.60)
    models = store.child("models")
    models.put_bytes("serving/1/saved_model.pb", b"pb")
    out = tmp_path / "export"
    registry.export(models, 1, out)
    assert (out / "model.keras").read_bytes() == blob
    assert (out / "manifest.json").exists() and (out / "metrics.json").exists()
    assert (out / "serving" / "saved_model.pb").read_bytes() == b"pb"
    with pytest.raises(InputError, match="no model version 2"):
        registry.export(models, 2, tmp_path / "none")


@pytest.mark.s3
def test_registry_keys_are_in_the_layout(s3_store: Store) -> None:
    assert models_uri("s3://b/x/") == "s3://b/x/models"
    assert (version_key(3), serving_key(3)) == ("versions/3", "serving/3")
    assert f"{MODELS}/{REGISTRY_FILE}" == "models/registry.json"
    latest = s3_store.child("models", "latest")
    assert registry.models_of_champion(latest).uri == f"{s3_store.uri}/models"
    bucket = open_store("s3://" + s3_store.uri.removeprefix("s3://").split("/")[0])
    with pytest.raises(InputError, match="needs a parent"):
        registry.models_of_champion(bucket)


def test_racing_promoters_never_show_a_half_written_champion(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four candidates promoted at once while a reader polls models/latest: whenever the
    reader finds a manifest that stays the same across its read, every file it lists has
    the listed bytes; every move of the alias is recorded, from the champion before it;
    `latest` ends as the last champion's copy; a candidate not promoted says why."""
    values = {"r1": 0.60, "r2": 0.70, "r3": 0.80, "r4": 0.90}
    runs = {r: make_candidate(store, r, v, 0.5) for r, v in values.items()}
    # Slow uploads widen every copy to `latest`, so that copies would overlap if they could.
    put_file = type(store).put_file

    def slow_put_file(self: Store, src: Any, key: str) -> str:
        time.sleep(0.05)
        return put_file(self, src, key)

    monkeypatch.setattr(type(store), "put_file", slow_put_file)
    latest = store.child("models", "latest")
    decisions: dict[str, dict[str, Any]] = {}
    done = threading.Event()
    whole_reads: list[int] = []
    torn: list[str] = []
    barrier = threading.Barrier(len(runs) + 1)

    def go(run_id: str) -> None:
        evaluation, model, _ = runs[run_id]
        barrier.wait()
        manifest = run_promote(CFG, evaluation, model, latest, run_id)
        decisions[run_id] = manifest["decision"]

    def read() -> None:
        barrier.wait()
        while not done.is_set():
            try:
                before = read_manifest(latest)
                if before is None:
                    continue
                blobs = {key: latest.get_bytes(key) for key in before["files"]}
                after = read_manifest(latest)
            except InputError:  # a file went away mid-read: the copy is being rewritten
                continue
            if after != before:
                continue  # rewritten while read: this read proves nothing
            for key, info in before["files"].items():
                if sha256_bytes(blobs[key]) != info["sha256"]:
                    torn.append(f"version {before.get('version')}: {key}")
            whole_reads.append(before["version"])

    reader = threading.Thread(target=read)
    threads = [threading.Thread(target=go, args=(r,)) for r in runs]
    for t in [reader, *threads]:
        t.start()
    for t in threads:
        t.join(120)
    done.set()
    reader.join(30)
    assert len(decisions) == len(runs)
    assert torn == [], "a half-written champion read as complete"
    reg = _registry(store)
    champ = reg["aliases"]["champion"]
    (winner,) = [r for r, d in decisions.items() if d["version"] == champ]
    # Promoted ones moved the alias in turn, each from the one before (a later, better
    # candidate may follow an earlier one); every other decision says why not.
    moves = [(h["from"], h["champion"]) for h in reg["history"]]
    assert [m[0] for m in moves] == [None, *[m[1] for m in moves[:-1]]]
    assert moves[-1][1] == champ
    promoted = sorted(d["version"] for d in decisions.values() if d["promoted"])
    assert promoted == sorted(m[1] for m in moves)
    for decision in decisions.values():
        if not decision["promoted"]:
            assert decision["reason"]
            if decision["version"] is not None:  # listed, no alias: it lost the alias race
                assert decision["reason"].startswith("lost the race"), decision["reason"]
    assert latest.get_bytes("model.keras") == runs[winner][2]
    assert whole_reads and whole_reads[-1] == champ  # the reader saw the final champion whole


def _claim(models: Store, n: int, run_id: str) -> None:
    mark = {"run_id": run_id, "pid": 1, "created_at": "2026-01-01T00:00:00+00:00", "version": n}
    models.put_bytes(f"{version_key(n)}/{OWNER}", json.dumps(mark).encode())


def test_a_promotion_stopped_mid_version_reuses_its_version(store: Store) -> None:
    """Killed after claiming a version and uploading part of it (no manifest, not listed):
    the rerun of that run takes the same number; another run's claim is left alone."""
    models = store.child("models")
    _claim(models, 1, "other")
    _claim(models, 2, "r1")
    models.put_bytes(f"{version_key(2)}/model.keras", b"half a model")
    decision, blob = promote_run(store, "r1", 0.60)
    assert decision["promoted"] is True and decision["version"] == 2
    reg = _registry(store)
    assert [e["version"] for e in reg["versions"]] == [2] and reg["aliases"]["champion"] == 2
    version = models.child(version_key(2))
    held = read_manifest(version)
    assert held is not None and held["run_id"] == "r1"
    assert version.get_bytes("model.keras") == blob
    assert json.loads(models.get_bytes(f"{version_key(1)}/{OWNER}"))["run_id"] == "other"


def test_a_promotion_stopped_mid_copy_to_latest_is_repaired_by_its_rerun(store: Store) -> None:
    """Killed while copying the newly listed champion to `latest` (its manifest removed,
    files half-copied): the rerun finds itself the champion, completes the copy and records
    the decision the stopped attempt made (against the champion it replaced)."""
    promote_run(store, "r0", 0.50)
    evaluation, model, blob = make_candidate(store, "r1", 0.60, 0.5)
    latest = store.child("models", "latest")
    first = run_promote(CFG, evaluation, model, latest, "r1")["decision"]
    latest.delete(MANIFEST)
    latest.put_bytes("model.keras", b"half a model")
    again = run_promote(CFG, evaluation, model, latest, "r1", force=True)["decision"]
    assert again == first and first["promoted"] is True and first["champion"]["version"] == 1
    held = read_manifest(latest)
    assert held is not None and held["version"] == 2
    assert latest.get_bytes("model.keras") == blob
    assert [e["version"] for e in _registry(store)["versions"]] == [1, 2]
