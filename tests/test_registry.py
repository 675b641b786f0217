"""The model registry on both stores: each promotion is a new version with its lineage,
the aliases move (champion, previous), rollback moves them back, models/latest follows,
and two promoters racing never both become the champion."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from skinlesion import promote, registry
from skinlesion.errors import InputError
from skinlesion.layout import MODELS, REGISTRY_FILE, models_uri, serving_key, version_key
from skinlesion.manifest import read_manifest
from skinlesion.promote import run_promote
from skinlesion.storage import Store, open_store
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
