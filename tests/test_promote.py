"""Promotion both ways: a better candidate replaces models/latest, a worse one (or one
losing melanoma recall) leaves the champion untouched; the decision is recorded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from skinlesion import config
from skinlesion.classes import NUM_CLASSES
from skinlesion.config import stage_settings
from skinlesion.errors import InputError
from skinlesion.manifest import claim, commit_stage, input_fingerprints, read_manifest
from skinlesion.metrics import compute_metrics
from skinlesion.promote import decide, promote_uri, run_promote
from skinlesion.results import EvaluateResult, Preprocessing
from skinlesion.storage import FileStore, Store, get_json, open_store, sha256_bytes
from tests.stage_results import evaluate_result
from tests.test_evaluate import write_model, write_prepared

# balanced accuracy, min_improvement 0, mel margin 0.02; the models are opaque bytes here,
# so no SavedModel (tests/test_serving.py exports real ones)
CFG = config.PromoteConfig(serving_export=False)


def _metrics(balanced: float, mel_recall: float, mel_support: int = 20) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, NUM_CLASSES, 50)
    metrics = compute_metrics(y, rng.dirichlet(np.ones(NUM_CLASSES), 50), 10)
    metrics["balanced_accuracy"] = balanced
    metrics["per_class"]["mel"]["recall"] = mel_recall
    metrics["per_class"]["mel"]["support"] = mel_support
    return metrics


def make_candidate(
    store: Store, run_id: str, balanced: float, mel_recall: float, val_seed: int = 0
) -> tuple[Store, Store, bytes]:
    """Committed prepare, train and evaluate prefixes of one run; the model is opaque bytes."""
    run = store.child("runs", run_id)
    prepared = run.child("prepare")
    if read_manifest(prepared) is None:
        write_prepared(prepared, per_class=(1,) * NUM_CLASSES, seed=val_seed)
    model = run.child("train")
    blob = f"model of {run_id}".encode()
    write_model(model, None, prepared, prepared, model_bytes=blob)
    evaluation = run.child("evaluate")

    def body(work: Path) -> EvaluateResult:
        metrics = _metrics(balanced, mel_recall)
        (work / "metrics.json").write_text(json.dumps(metrics))
        (work / "report.html").write_text(f"<p>{run_id}</p>")
        return evaluate_result(sha256_bytes(blob), Preprocessing(32, "crop", 95))

    inputs = input_fingerprints({"model": model.uri, "val_data": prepared.uri})
    commit_stage(
        "evaluate", evaluation, stage_settings("evaluate", config.EvaluateConfig()), inputs, body
    )
    return evaluation, model, blob


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "store")


def _promote(
    store: Store,
    run_id: str,
    balanced: float,
    mel: float,
    cfg: config.PromoteConfig = CFG,
    **kw: Any,
) -> tuple[dict[str, Any], bytes]:
    evaluation, model, blob = make_candidate(store, run_id, balanced, mel, **kw)
    manifest = run_promote(cfg, evaluation, model, store.child("models", "latest"), run_id)
    return manifest, blob


def _snapshot(target: Store) -> dict[str, bytes]:
    return {o.key: target.get_bytes(o.key) for o in target.list()}


def test_promote_uri() -> None:
    assert promote_uri("s3://b/x/runs/r1/evaluate") == "s3://b/x/runs/r1/promote"
    assert promote_uri("file:///s/runs/r1/evaluate/") == "file:///s/runs/r1/promote"
    with pytest.raises(InputError):
        promote_uri("s3://bucket")


def test_first_candidate_becomes_champion(store: FileStore) -> None:
    manifest, blob = _promote(store, "r1", 0.60, 0.50)
    target = store.child("models", "latest")
    decision = manifest["decision"]
    assert decision["promoted"] is True and decision["champion"] is None
    assert decision["reason"] == "no champion yet"
    assert decision["candidate"]["metric"] == 0.60 and decision["candidate"]["mel_recall"] == 0.50
    assert decision["run_id"] == "r1"
    assert target.get_bytes("model.keras") == blob
    assert get_json(target, "metrics.json")["balanced_accuracy"] == 0.60
    champion = read_manifest(target)
    assert champion is not None
    assert champion["run_id"] == "r1" and champion["metric_value"] == 0.60
    assert champion["preprocessing"]["resize"] == "crop"
    assert set(champion["files"]) == {"model.keras", "metrics.json", "report.html"}
    # The decision is a file of the promote prefix too, next to its manifest.
    promote = store.child("runs", "r1", "promote")
    assert get_json(promote, "decision.json") == decision
    assert read_manifest(promote) == manifest


def test_better_candidate_replaces_champion(store: FileStore) -> None:
    _promote(store, "r1", 0.60, 0.50)
    manifest, blob = _promote(store, "r2", 0.65, 0.49)  # mel -0.01: within the margin
    decision = manifest["decision"]
    assert decision["promoted"] is True, decision["reason"]
    assert decision["champion"]["metric"] == 0.60 and decision["champion"]["run_id"] == "r1"
    assert decision["candidate"]["metric"] == 0.65
    assert decision["same_val_data"] is True
    target = store.child("models", "latest")
    assert target.get_bytes("model.keras") == blob
    assert read_manifest(target)["run_id"] == "r2"  # type: ignore[index]
    assert get_json(target, "metrics.json")["balanced_accuracy"] == 0.65


@pytest.mark.parametrize(
    ("balanced", "mel", "cfg", "why"),
    [
        (0.55, 0.50, CFG, "does not beat"),
        (0.60, 0.50, CFG, "does not beat"),  # equal is not better
        (0.70, 0.45, CFG, "melanoma recall drops by 0.0500"),
        (
            0.605,
            0.50,
            config.PromoteConfig(min_improvement=0.01, serving_export=False),
            "needed > 0.0100",
        ),
    ],
)
def test_candidate_rejected_champion_unchanged(
    store: FileStore, balanced: float, mel: float, cfg: config.PromoteConfig, why: str
) -> None:
    _promote(store, "r1", 0.60, 0.50)
    target = store.child("models", "latest")
    before = _snapshot(target)
    manifest, _ = _promote(store, "r2", balanced, mel, cfg=cfg)
    decision = manifest["decision"]
    assert decision["promoted"] is False
    assert why in decision["reason"]
    assert decision["candidate"]["metric"] == balanced
    assert decision["champion"]["metric"] == 0.60 and decision["champion"]["mel_recall"] == 0.50
    assert _snapshot(target) == before
    assert get_json(store.child("runs", "r2", "promote"), "decision.json") == decision


def test_margin_edge_is_allowed(store: FileStore) -> None:
    _promote(store, "r1", 0.60, 0.50)
    manifest, _ = _promote(store, "r2", 0.61, 0.48)  # a drop of exactly the margin 0.02
    assert manifest["decision"]["promoted"] is True, manifest["decision"]["reason"]


def test_other_validation_data_is_noted(store: FileStore) -> None:
    _promote(store, "r1", 0.60, 0.50)
    manifest, _ = _promote(store, "r2", 0.70, 0.50, val_seed=1)
    assert manifest["decision"]["same_val_data"] is False
    assert "other validation data" in manifest["decision"]["reason"]


def test_rerun_is_skipped_and_crash_after_publish_is_recognised(store: FileStore) -> None:
    first, _ = _promote(store, "r1", 0.60, 0.50)
    evaluation = store.child("runs", "r1", "evaluate")
    model = store.child("runs", "r1", "train")
    target = store.child("models", "latest")
    assert run_promote(CFG, evaluation, model, target, "r1") == first  # skipped
    # A crash between publishing the champion and committing the promote prefix:
    store.child("runs", "r1", "promote").delete("manifest.json")
    again = run_promote(CFG, evaluation, model, target, "r1")
    assert again["decision"] == first["decision"]  # recognised: decided as the first time


def test_candidate_must_be_an_evaluation_of_the_model(store: FileStore) -> None:
    evaluation, _, _ = make_candidate(store, "r1", 0.6, 0.5)
    other, _, _ = make_candidate(store, "r2", 0.7, 0.5)
    with pytest.raises(InputError, match="another model"):
        run_promote(
            CFG,
            evaluation,
            store.child("runs", "r2", "train"),
            store.child("models", "latest"),
            "r1",
        )
    assert read_manifest(store.child("models", "latest")) is None
    assert other.exists("metrics.json")


def test_half_published_champion_counts_as_none(store: FileStore) -> None:
    target = store.child("models", "latest")
    claim("champion", target)  # a crashed publish: claimed, half copied, no manifest
    target.put_bytes("model.keras", b"left over by a crash, no manifest")
    manifest, blob = _promote(store, "r1", 0.30, 0.10)
    assert manifest["decision"]["promoted"] is True
    assert manifest["decision"]["champion"] is None
    assert target.get_bytes("model.keras") == blob


@pytest.mark.parametrize(
    ("cand", "champ", "promoted", "why"),
    [
        ({"metric": None, "mel_recall": 0.5, "mel_support": 3}, None, False, "has no"),
        ({"metric": 0.5, "mel_recall": 0.0, "mel_support": 0}, None, True, "no champion"),
        (
            {"metric": 0.9, "mel_recall": 0.0, "mel_support": 0},
            {"metric": 0.5, "mel_recall": 0.5},
            False,
            "no melanoma",
        ),
        (
            {"metric": 0.6, "mel_recall": 0.5, "mel_support": 3},
            {"metric": None, "mel_recall": 0.5},
            True,
            "champion has no",
        ),
    ],
)
def test_decide_edge_cases(cand: dict, champ: dict | None, promoted: bool, why: str) -> None:
    ok, reason = decide(CFG, cand, champ)
    assert ok is promoted and why in reason


def test_promotion_on_s3(s3_uri: str) -> None:
    store = open_store(s3_uri)
    _promote(store, "r1", 0.60, 0.50)
    manifest, blob = _promote(store, "r2", 0.70, 0.50)
    assert manifest["decision"]["promoted"] is True
    target = store.child("models", "latest")
    assert target.get_bytes("model.keras") == blob
    worse, _ = _promote(store, "r3", 0.40, 0.50)
    assert worse["decision"]["promoted"] is False
    assert target.get_bytes("model.keras") == blob
    assert get_json(store.child("runs", "r3", "promote"), "decision.json")["promoted"] is False


def test_explicit_out_prefix(store: FileStore) -> None:
    evaluation, model, _ = make_candidate(store, "r1", 0.6, 0.5)
    out = store.child("elsewhere", "promote")
    manifest = run_promote(CFG, evaluation, model, store.child("models", "latest"), "r1", out=out)
    assert read_manifest(out) == manifest
    assert read_manifest(store.child("runs", "r1", "promote")) is None
