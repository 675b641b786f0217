"""Promote stage: make the candidate the champion when it beats it (registry.py: a new
version, the `champion` alias moved, `models/latest` rewritten as its copy).

Rule: both models are scored on the candidate's validation images (the champion's
recorded predictions when it was evaluated on those images, else the champion model
rescored on them: skinlesion.fair), less those of lesions the champion trained on. The
lower bound of the 95% paired lesion-bootstrap interval of candidate minus champion in
`metric` (balanced accuracy by default) must exceed `min_improvement`, and the
candidate's melanoma recall must not drop by more than `melanoma_recall_margin`. Where
no paired comparison is possible (an old champion without predictions whose candidate
data is gone), the point gain is compared and the decision says so. With no champion
the candidate is promoted. With `require_no_drift` a promotion is held for review when
prepare's data report flags drift (data_report.py). The decision and both scores are
recorded either way, in `runs/<id>/promote/decision.json` and in that prefix's manifest.
A registered version also gets its SavedModel (serving.py) unless `serving_export` is
off.

The champion prefix follows the commit protocol too: the old `manifest.json`
is removed first, the files are copied, the new manifest is written last, so
a reader never takes a half-copied champion for a finished one.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from skinlesion import bootstrap, config, data_report, fair, logs, registry, serving
from skinlesion.classes import MELANOMA
from skinlesion.errors import DamagedRun, InputError
from skinlesion.layout import (
    DECISION_FILE,
    METRICS_FILE,
    MODEL_FILE,
    PREDICTIONS_FILE,
    REPORT_FILE,
    sibling_stage_uri,
)
from skinlesion.manifest import (
    MANIFEST,
    check_disjoint,
    check_owned,
    claim,
    clear,
    commit_stage,
    input_fingerprints,
    publish,
    read_result,
)
from skinlesion.metrics import compute_metrics, headline
from skinlesion.results import (
    ChampionResult,
    EvaluateResult,
    PromoteResult,
    TrainResult,
)
from skinlesion.scratch import scratch_dir
from skinlesion.storage import Store, get_json, open_store

CHAMPION_STAGE = "champion"
RESCORE_BATCH = 64  # images per prediction step when the champion is rescored
_EPS = 1e-12  # float slack on the melanoma-recall margin (0.5 - 0.48 > 0.02 in binary)


def promote_uri(candidate_uri: str) -> str:
    """The promote stage's own prefix: the sibling of the evaluate prefix."""
    uri = sibling_stage_uri(candidate_uri, "promote")
    if uri is None:
        raise InputError(f"candidate {candidate_uri} is not a stage prefix (…/runs/<id>/evaluate)")
    return uri


def _scores(metrics: dict[str, Any], metric: str) -> dict[str, Any]:
    mel = metrics.get("per_class", {}).get(MELANOMA, {})
    return {
        "metric": metrics.get(metric),
        "mel_recall": mel.get("recall"),
        "mel_support": mel.get("support"),
    }


def decide(
    cfg: config.PromoteConfig,
    candidate: dict[str, Any],
    champion: dict[str, Any] | None,
    interval: list[float] | None = None,
) -> tuple[bool, str]:
    """(promote?, reason) from the candidate's and the champion's `_scores`; `interval` is
    the paired bootstrap interval of the gain when both were scored on the same images,
    and then its lower bound, not the point gain, must clear `min_improvement`."""
    name = cfg.metric
    if candidate["metric"] is None:
        return False, f"the candidate has no {name} (undefined on its validation data)"
    if champion is None:
        return True, "no champion yet"
    if not candidate["mel_support"]:
        return False, "melanoma recall cannot be checked: no melanoma in the candidate's val data"
    if champion["metric"] is None:
        beats, versus = True, f"the champion has no {name}"
    else:
        gain = candidate["metric"] - champion["metric"]
        if interval is None:
            beats = gain > cfg.min_improvement
            versus = (
                f"{name} {candidate['metric']:.4f} vs champion {champion['metric']:.4f} "
                f"(gain {gain:+.4f}, needed > {cfg.min_improvement:.4f})"
            )
        else:
            beats = interval[0] > cfg.min_improvement
            versus = (
                f"{name} {candidate['metric']:.4f} vs champion {champion['metric']:.4f} on the "
                f"same images (gain {gain:+.4f}, 95% interval {interval[0]:+.4f} to "
                f"{interval[1]:+.4f}; its lower bound must exceed {cfg.min_improvement:.4f})"
            )
    if not beats:
        return False, f"does not beat the champion: {versus}"
    drop = (champion["mel_recall"] or 0.0) - candidate["mel_recall"]
    if drop > cfg.melanoma_recall_margin + _EPS:
        return False, (
            f"melanoma recall drops by {drop:.4f} ({candidate['mel_recall']:.4f} vs champion "
            f"{champion['mel_recall']:.4f}), more than the margin "
            f"{cfg.melanoma_recall_margin:.4f}; {versus}"
        )
    return True, f"beats the champion: {versus}; melanoma recall change {-drop:+.4f}"


def publish_champion(
    target: Store, model: Store, candidate: Store, fields: dict[str, Any]
) -> dict[str, Any]:
    """Replace the champion under `target` by the commit protocol of the stages: refuse a
    prefix that is not a champion's, copy locally, then claim, uncommit and clear the old
    champion, upload, write the manifest last."""
    check_disjoint(CHAMPION_STAGE, target.uri, {"model": model.uri, "candidate": candidate.uri})
    check_owned(CHAMPION_STAGE, target)
    with scratch_dir("skinlesion-promote-") as work:
        _download(model, candidate, work)
        claim(CHAMPION_STAGE, target)
        clear(target, keep_state=False)  # removes manifest.json first, then the old files
        return publish(target, work, fields, CHAMPION_STAGE)


def _champion(target: Store) -> tuple[int | None, ChampionResult, Store] | None:
    return registry.champion_of(target)  # a module-level name: tests replace it (stale reads)


_OPTIONAL = (REPORT_FILE, PREDICTIONS_FILE)  # a champion's files an evaluation may lack


def _download(model: Store, candidate: Store, work: Path) -> None:
    files = (MODEL_FILE, METRICS_FILE, REPORT_FILE, PREDICTIONS_FILE)
    for source, key in zip((model, candidate, candidate, candidate), files, strict=True):
        if key not in _OPTIONAL or source.exists(key):
            source.get_file(key, work / key)


def _paired(
    cfg: config.PromoteConfig,
    candidate: Store,
    evaluation: dict[str, Any],
    champion: Store,
    current: ChampionResult,
) -> dict[str, Any] | None:
    """The champion's scores on the candidate's validation images, less those of lesions
    it trained on (`current`: its manifest, which names its data), and the paired
    bootstrap of the gain; None when the champion cannot be scored on them."""
    got = fair.champion_on_candidate_images(candidate, evaluation, champion, RESCORE_BATCH)
    if got is None:
        return None
    mine, theirs, how = got
    trained = fair.champion_training_lesions(current)
    mine, theirs, left_out = fair.unseen_by_champion(mine, theirs, trained)
    if not mine.image_ids:
        return None  # the champion trained on every candidate lesion: no fair comparison
    gain = bootstrap.paired_gain(mine.labels, mine.proba, theirs.proba, mine.lesions, cfg.metric)
    return {
        "how": how,
        "n_images": len(mine.image_ids),
        "left_out_champion_trained": left_out,
        # both on the compared images (the candidate's own figures cover all of its images)
        "candidate": _scores(compute_metrics(mine.labels, mine.proba), cfg.metric)
        if left_out["images"]
        else None,
        "champion": _scores(compute_metrics(theirs.labels, theirs.proba), cfg.metric),
        "gain": gain,
    }


def run_promote(
    cfg: config.PromoteConfig,
    candidate: Store,
    model: Store,
    target: Store,
    run_id: str,
    force: bool = False,
    out: Store | None = None,
) -> dict[str, Any]:
    """Decide, promote when the rule says so, record the decision; returns the manifest.

    `out` is this stage's prefix; by default the sibling `promote` of the candidate's
    (`…/runs/<id>/evaluate` -> `…/runs/<id>/promote`), where the pipeline puts it.
    """
    log = logs.get()
    settings = config.stage_settings("promote", cfg)
    inputs = input_fingerprints({"candidate": candidate.uri, "model": model.uri})
    out = out if out is not None else open_store(promote_uri(candidate.uri))
    evaluation, evaluated = read_result(candidate, EvaluateResult, "candidate")
    model_manifest, trained = read_result(model, TrainResult, "model")
    # The model's identity is its content: two runs with the same settings and inputs
    # share a fingerprint but not their trained weights.
    if MODEL_FILE not in model_manifest["files"]:
        raise InputError(f"{model.uri}/{MANIFEST} does not record {MODEL_FILE}")
    model_sha = model_manifest["files"][MODEL_FILE]["sha256"]
    if evaluation["inputs"].get("model") != inputs["model"] or evaluated.model_sha256 != model_sha:
        problem = f"candidate {candidate.uri} is an evaluation of another model than {model.uri}"
        if model.uri in {sibling_stage_uri(candidate.uri, s) for s in ("train", "finetune")}:
            # One run's own prefixes: its model was rewritten after it was evaluated (e.g.
            # by a concurrent writer). Not the user's input; a rerun re-evaluates it.
            raise DamagedRun(problem)
        raise InputError(problem)

    def body(work: Path) -> PromoteResult:
        metrics = get_json(candidate, METRICS_FILE)
        cand = _scores(metrics, cfg.metric)
        found = _champion(target)
        champ: dict[str, Any] | None = None
        held = ""
        same_val: bool | None = None
        version: int | None = None
        paired: dict[str, Any] | None = None

        def against(
            n: int | None, current: ChampionResult, store: Store
        ) -> tuple[dict[str, Any], dict[str, Any] | None]:
            """The champion's figures on the candidate's images where it can be scored on
            them (its `recorded` ones are on its own data), and the paired comparison."""
            recorded = _scores(get_json(store, METRICS_FILE), cfg.metric)
            pair = None
            if current.model_sha256 != model_sha:
                pair = _paired(cfg, candidate, evaluation, store, current)
            return {
                **(pair["champion"] if pair else recorded),
                "recorded": recorded,
                "run_id": current.run_id,
                "promoted_at": current.promoted_at,
                "model_uri": current.model_uri,
                "version": n,
            }, pair

        def judge(champion: dict[str, Any] | None, pair: dict[str, Any] | None) -> tuple[bool, str]:
            if pair is None:
                return decide(cfg, cand, champion)
            return decide(cfg, pair["candidate"] or cand, champion, pair["gain"]["interval"])

        def redecide(n: int, current: ChampionResult, store: Store) -> tuple[bool, str]:
            return judge(*against(n, current, store))

        already = "already the champion (an earlier attempt promoted it)"
        if found is not None and found[1].model_sha256 == model_sha and found[0] is not None:
            # An attempt of this promotion stopped after moving the alias: finish its copy
            # to `latest`, and decide against the champion it replaced, as it did.
            version = found[0]
            models = registry.models_of_champion(target)
            registry.sync_latest(models)
            found = registry.replaced_by(models, version)
        if found is not None:
            champ, paired = against(*found)
            same_val = found[1].val_data_fingerprint == evaluation["inputs"]["val_data"]
        if version is not None:
            won, reason = judge(champ, paired)
            promoted, reason = True, reason if won else already
        elif found is not None and found[1].model_sha256 == model_sha:
            promoted, reason = True, already  # a champion written before the registry
        else:
            promoted, reason = judge(champ, paired)
            if promoted and cfg.require_no_drift and found is not None:
                held = data_report.held_for_review(candidate.uri, evaluation)
                if held:  # a reviewer releases it: rerun with promote.require_no_drift=false
                    promoted, reason = False, f"held for review: {held}; otherwise: {reason}"
            if promoted:
                check_disjoint(
                    CHAMPION_STAGE, target.uri, {"model": model.uri, "candidate": candidate.uri}
                )
                check_owned(CHAMPION_STAGE, target)
                with (
                    scratch_dir("skinlesion-promote-") as files,
                    scratch_dir("skinlesion-serving-") as saved,
                ):
                    _download(model, candidate, files)
                    export = None
                    if cfg.serving_export:  # built before a version number is claimed
                        built = serving.build(files / MODEL_FILE, evaluated.preprocessing, saved)
                        export = (saved, {**built, "model_sha256": model_sha, "run_id": run_id})
                    registered = registry.register(
                        registry.models_of_champion(target),
                        files,
                        {
                            "stage": CHAMPION_STAGE,
                            "fingerprint": model_sha,  # the champion is its model file
                            **ChampionResult(
                                model_sha256=model_sha,
                                model_fingerprint=model_manifest["fingerprint"],
                                model_uri=model.uri,
                                model_stage=model_manifest["stage"],
                                evaluation_uri=candidate.uri,
                                evaluation_fingerprint=evaluation["fingerprint"],
                                val_data_fingerprint=evaluation["inputs"]["val_data"],
                                run_id=run_id,
                                promoted_at=datetime.now(UTC).isoformat(timespec="seconds"),
                                metric=cfg.metric,
                                metric_value=cand["metric"],
                                mel_recall=cand["mel_recall"],
                                metrics=headline(metrics),
                                preprocessing=evaluated.preprocessing,
                                synthetic=evaluated.synthetic,
                                backbone=trained.backbone,
                                image_size=trained.image_size,
                                settings=model_manifest["settings"],
                            ).to_manifest(),
                        },
                        registry.lineage(candidate, [evaluation, model_manifest]),
                        found[0] if found is not None else None,
                        redecide,
                        export,
                    )
                version = registered.version
                if not registered.champion:
                    promoted, reason = False, registered.reason
        left_out = paired["left_out_champion_trained"] if paired else None
        if left_out and left_out["images"]:
            reason += (
                f" (left out: {left_out['images']} images of {left_out['lesions']} lesions "
                "the champion trained on)"
            )
        if same_val is False and paired is None:
            reason += " (note: the champion was evaluated on other validation data)"
        decision = {
            "promoted": promoted,
            "reason": reason,
            "metric": cfg.metric,
            "min_improvement": cfg.min_improvement,
            "melanoma_recall_margin": cfg.melanoma_recall_margin,
            "candidate": {**cand, "run_id": run_id, "evaluation_uri": candidate.uri},
            "champion": champ,
            "same_val_data": same_val,
            "comparison": paired,  # both on the candidate's images, or None
            "held_for_review": bool(held),
            "version": version,
            "run_id": run_id,
            "target": target.uri,
        }
        (work / DECISION_FILE).write_text(json.dumps(decision, indent=2, allow_nan=False) + "\n")
        return PromoteResult(decision)

    manifest = commit_stage(
        "promote",
        out,
        settings,
        inputs,
        body,
        force,
        input_uris={"candidate": candidate.uri, "model": model.uri, "champion": target.uri},
    )
    decision = manifest["decision"]
    champion = decision["champion"] or {}
    log.info(
        "promote_done",
        promoted=decision["promoted"],
        reason=decision["reason"],
        metric=decision["metric"],
        candidate_metric=decision["candidate"]["metric"],
        candidate_mel_recall=decision["candidate"]["mel_recall"],
        champion_metric=champion.get("metric"),
        champion_mel_recall=champion.get("mel_recall"),
        target=target.uri,
    )
    return manifest
