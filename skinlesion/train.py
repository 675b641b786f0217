"""Train (phase top) and fine-tune (phase finetune) stages, preemption-safe.

The stage entrypoint: it puts together the runtime (`train_runtime`), the data
(`train_data`), the resume state (`train_state`) and the callbacks
(`train_callbacks`) for the `trainer`, and commits what it writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from skinlesion import config, logs, train_runtime
from skinlesion.errors import InputError
from skinlesion.manifest import (
    STATE_PREFIX,
    commit_stage,
    fingerprint,
    input_fingerprints,
    is_done,
    read_manifest,
)
from skinlesion.results import TrainResult
from skinlesion.scratch import scratch_dir
from skinlesion.storage import FileStore, Store, download_prefix
from skinlesion.train_callbacks import TrainCallbacks
from skinlesion.train_cluster import Cluster
from skinlesion.train_data import load_train_data
from skinlesion.train_models import InitModel, fresh_state
from skinlesion.train_state import StateBackup
from skinlesion.trainer import STAGE_OF_PHASE, Phase, Trainer, phase_epochs

BEST_CKPT = "checkpoints/best.weights.h5"  # in the stage output: the best-val weights


def run_train(
    cfg: config.TrainConfig,
    phase: Phase,
    train_data: Store,
    val_data: Store,
    out: Store,
    init_model: Store | None = None,
    force: bool = False,
    cluster: Cluster | None = None,
) -> dict[str, Any]:
    """Train one phase and commit `model.keras`, history, curves and config under `out`.

    With a `cluster` (several pods training together) only the chief writes to `out`; the
    other workers start from the chief's resume state and write into a scratch copy."""
    if phase not in STAGE_OF_PHASE:
        raise InputError(f"phase must be 'top' or 'finetune', got {phase!r}")
    stage = STAGE_OF_PHASE[phase]
    names = {"train_data": train_data.uri, "val_data": val_data.uri}
    if phase == "finetune":
        if init_model is None:
            raise InputError("phase finetune needs init_model (the top phase's output)")
        names["init_model"] = init_model.uri
    settings = config.stage_settings(stage, cfg)
    inputs = input_fingerprints(names)
    fp = fingerprint(stage, settings, inputs)
    init = init_model if phase == "finetune" else None

    def body(work: Path) -> TrainResult:
        if phase_epochs(cfg, phase) < 1:
            raise InputError(f"train.{phase}_epochs is 0: nothing to train")
        log = logs.get().bind(phase=phase)
        with (
            scratch_dir("skinlesion-train-") as tmp,
            train_runtime.select_runtime(cfg, cluster) as runtime,  # before TF touches GPUs
        ):
            data = load_train_data(train_data, val_data, tmp / "data")
            batch_size = runtime.global_batch(cfg.batch_size)
            if batch_size != cfg.batch_size:
                log.warning(
                    "batch_size_rounded",
                    batch_size=cfg.batch_size,
                    to=batch_size,
                    replicas=runtime.replicas,
                )
            best_file = work / BEST_CKPT
            best_file.parent.mkdir(parents=True, exist_ok=True)
            backups = StateBackup(out, fp, tmp, best_file)
            resumed = backups.load()
            init_from = None if init is None else InitModel.read(init)
            if resumed is None:
                state = fresh_state(fp, phase, init_from, inputs["val_data"])
            else:
                state = resumed
            trainer = Trainer(
                cfg,
                phase,
                data,
                runtime,
                backups,
                TrainCallbacks.restored(cfg, state, best_file),
                state,
                batch_size=batch_size,
                resumed=resumed is not None,
                init=init_from,
            )
            return trainer.run(work, tmp)

    if cluster is not None and not cluster.chief:
        return _as_worker(out, fp, lambda own: commit_stage(
            stage, own, settings, inputs, body, force, input_uris=names, claim_first=True
        ))  # fmt: skip
    # Training keeps resume state under out/state/ while it runs: claim the prefix first.
    return commit_stage(
        stage, out, settings, inputs, body, force, input_uris=names, claim_first=True
    )


def _as_worker(out: Store, fp: str, commit: Any) -> dict[str, Any]:
    """A non-chief worker: trains in step with the chief (the same epochs: it starts from
    the chief's resume state) but writes only to a scratch copy of the output, dropped at
    the end. A stage the chief has committed is skipped, as the chief skips it."""
    if is_done(out, fp):
        manifest = read_manifest(out)
        assert manifest is not None
        return manifest
    with scratch_dir("skinlesion-worker-") as tmp:
        own = FileStore(tmp / "out")
        download_prefix(out, STATE_PREFIX, tmp / "out" / STATE_PREFIX)
        return dict(commit(own))
