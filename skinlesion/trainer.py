"""The trainer of one phase: gets its models (`train_models`: the full classifier and
the part that trains, on cached features where valid), fits it with a state backup after
every epoch, and writes the stage outputs (always the full model).

Phase top: rmsprop. Phase finetune: Adam at `finetune_learning_rate`. Both: categorical
cross-entropy, EarlyStopping on val_loss and on val_accuracy, best-val_accuracy
checkpoint; class weights when the training set is not class-balanced by augment.
"""

from __future__ import annotations

import json
import math
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import keras
import numpy as np

from skinlesion import config, faults, feature_cache, logs, train_seeds
from skinlesion import model as model_lib
from skinlesion.classes import CLASSES
from skinlesion.errors import Terminated
from skinlesion.feature_cache import CachePlan
from skinlesion.layout import MODEL_FILE
from skinlesion.obs.tensorboard_log import EventLog
from skinlesion.plots.training import training_curves
from skinlesion.results import TrainResult
from skinlesion.storage import get_json
from skinlesion.train_callbacks import EpochBackup, StepProgress, TrainCallbacks, TrainTelemetry
from skinlesion.train_data import TrainData, class_weights
from skinlesion.train_inputs import Inputs, memory_budget
from skinlesion.train_models import InitModel, phase_models
from skinlesion.train_runtime import Runtime, dtype_policy, multi_worker_model
from skinlesion.train_state import METRICS, StateBackup, TrainState

Phase = Literal["top", "finetune"]
STAGE_OF_PHASE: dict[str, str] = {"top": "train", "finetune": "finetune"}


def phase_epochs(cfg: config.TrainConfig, phase: Phase) -> int:
    return cfg.top_epochs if phase == "top" else cfg.finetune_epochs


class Trainer:
    """One attempt at a phase, from what it works with; `run` once."""

    def __init__(
        self,
        cfg: config.TrainConfig,
        phase: Phase,
        data: TrainData,
        runtime: Runtime,
        backups: StateBackup,
        callbacks: TrainCallbacks,
        state: TrainState,
        *,
        batch_size: int,  # global, a multiple of the replicas
        resumed: bool,
        init: InitModel | None,
    ) -> None:
        self.cfg, self.phase, self.data, self.runtime = cfg, phase, data, runtime
        self.backups, self.callbacks, self.state = backups, callbacks, state
        self.batch_size = batch_size
        self.resumed_from = state.epochs_done if resumed else None
        self.init = init
        self.log = logs.get().bind(phase=phase)
        self.total_epochs = phase_epochs(cfg, phase)
        self.steps_per_epoch = cfg.steps_per_epoch or math.ceil(data.train_count / batch_size)
        self.class_weight = class_weights(cfg.class_weights, data)

    # -- model ---------------------------------------------------------------------------

    def compile(self, model: Any) -> None:
        cfg = self.cfg
        top = self.phase == "top"
        lr: Any = cfg.top_learning_rate if top else cfg.finetune_learning_rate
        if cfg.lr_schedule == "cosine":  # by optimizer step: restored with the optimizer
            lr = keras.optimizers.schedules.CosineDecay(
                lr, decay_steps=max(1, self.total_epochs * self.steps_per_epoch), alpha=0.1
            )
        opt = keras.optimizers.RMSprop(learning_rate=lr) if top else keras.optimizers.Adam(lr)
        model.compile(
            optimizer=opt,
            loss="categorical_crossentropy",
            metrics=["accuracy"],
            jit_compile=self.runtime.jit_compile,
        )

    def models(self, work: Path, tmp: Path) -> tuple[Any, Any, Inputs, CachePlan]:
        """(full model, the model that trains, its inputs, the cache plan); compiled, or
        restored with its optimizer, and the best-so-far weights file written."""
        st = self.state
        full, model, inputs, cache = phase_models(
            self.cfg, self.phase, self.data, self.init, work, tmp, memory_budget(),
            self.runtime.workers,
            restore=None if self.resumed_from is None else self.backups.restore_model,
            state=st,
        )  # fmt: skip
        if self.runtime.workers > 1:
            model = multi_worker_model(model, self.runtime.strategy)
        if self.resumed_from is None:
            self.compile(model)
            if st.best_val_accuracy is not None:  # finetune: the init model is the best so far
                model.save_weights(self.backups.best_file)
                self.backups.best_changed = True  # the first backup stores it
        return full, model, inputs, cache

    # -- per epoch -----------------------------------------------------------------------

    def epoch_done(
        self, epoch: int, logs_: dict[str, Any], seconds: float, train_s: float, model: Any
    ) -> None:
        st = self.state
        ips = self.steps_per_epoch * self.batch_size / train_s if train_s > 0 else 0.0
        st.history["epoch"].append(epoch + 1)
        for key in METRICS:
            st.history[key].append(float(logs_.get(key, float("nan"))))
        st.history["seconds"].append(round(seconds, 2))
        st.history["images_per_s"].append(round(ips, 1))
        st.epochs_done = epoch + 1
        st.interrupted_in_epoch = None
        best = self.callbacks.checkpoint.best  # the checkpoint wrote the file if this is better
        if best is not None and (st.best_val_accuracy is None or best > st.best_val_accuracy):
            st.best_val_accuracy = float(best)
            st.best_epoch = epoch + 1
            self.backups.best_changed = True
        st.early_stopping = self.callbacks.snapshot()
        if self.callbacks.early_stop() or epoch + 1 >= self.total_epochs:
            st.finished = True
            st.stop_reason = self.stop_reason(epoch + 1)
        self.log.info(
            "epoch",
            epoch=epoch + 1,
            epochs=self.total_epochs,
            loss=_r(logs_.get("loss")),
            accuracy=_r(logs_.get("accuracy")),
            val_loss=_r(logs_.get("val_loss")),
            val_accuracy=_r(logs_.get("val_accuracy")),
            best_val_accuracy=_r(st.best_val_accuracy),
            seconds=round(seconds, 1),
            images_per_s=round(ips, 1),
        )
        faults.point("epoch")
        self.backups.save(st, model, f"epoch-{epoch + 1:04d}")

    def stop_reason(self, epochs_done: int) -> str:
        reached = f"reached {epochs_done} epochs" if epochs_done >= self.total_epochs else ""
        return self.callbacks.early_stop() or reached

    # -- the run -------------------------------------------------------------------------

    def run(self, work: Path, tmp: Path) -> TrainResult:
        """Train what is left of the phase under the runtime's strategy, then write the
        outputs into `work`; returns the manifest's extra fields."""
        cfg, data, runtime, st, log = self.cfg, self.data, self.runtime, self.state, self.log
        best_file = self.backups.best_file
        keras.utils.set_random_seed(cfg.seed)  # the initial weights of new layers
        log.info(
            "train_start",
            backbone=cfg.backbone,
            weights=cfg.weights,
            image_size=data.image_size,
            train_images=data.train_count,
            val_images=data.val_count,
            train_labels=dict(zip(CLASSES, data.label_counts, strict=True)),
            class_weights=_by_class(self.class_weight, 3),
            batch_size=self.batch_size,
            steps_per_epoch=self.steps_per_epoch,
            epochs=self.total_epochs,
            gpus=runtime.gpus,
            replicas=runtime.replicas,
            mixed_precision=runtime.mixed_precision,
        )
        stage = STAGE_OF_PHASE[self.phase]  # TensorBoard events and MLflow metrics per epoch
        self.telemetry = TrainTelemetry(
            stage, st, EventLog(work, self.backups.out), self.steps_per_epoch
        )
        with runtime.strategy.scope():
            if self.resumed_from is not None:
                st.resumes += 1
                log.info(
                    "resuming",
                    epoch=st.epochs_done,
                    epochs=self.total_epochs,
                    best_val_accuracy=_r(st.best_val_accuracy),
                    interrupted_in_epoch=st.interrupted_in_epoch,
                    finished=st.finished,
                )
            full, model, inputs, cache = self.models(work, tmp)
            log.info("inputs", path=inputs.path, sample_shape=list(inputs.sample_shape))
            if not st.finished and st.epochs_done < self.total_epochs:
                self.fit(model, inputs)
            if not best_file.exists():  # no epoch had a finite val_accuracy
                model.save_weights(best_file)
        return self.finish(full, model, work, {"inputs": inputs.path, **_cache_fields(cache)})

    def fit(self, model: Any, inputs: Inputs) -> None:
        cfg, st = self.cfg, self.state
        epochs = range(st.epochs_done, self.total_epochs)
        seeds = [train_seeds.epoch_seed(cfg.seed, self.phase, e) for e in epochs]
        train_ds = inputs.train(self.batch_size, self.steps_per_epoch, seeds)
        val_ds = inputs.val(self.batch_size)
        backup = EpochBackup(self.epoch_done)
        try:
            model.fit(
                train_ds,
                validation_data=val_ds,
                epochs=self.total_epochs,
                initial_epoch=st.epochs_done,
                steps_per_epoch=self.steps_per_epoch,
                class_weight=self.class_weight,
                callbacks=[
                    train_seeds.EpochSeeds(cfg.seed, self.phase),
                    *self.callbacks.stoppers.values(),
                    self.callbacks.checkpoint,
                    backup,
                    self.telemetry,  # after the backup: logs what the state holds
                    StepProgress(
                        STAGE_OF_PHASE[self.phase], self.total_epochs, self.steps_per_epoch
                    ),
                    *faults.keras_callbacks(),
                ],
                verbose=0,  # StepProgress: a bar on a terminal, progress lines in a pod
                shuffle=False,  # the dataset shuffles itself
            )
        except Terminated:
            # Preempted: keep what this epoch has learnt; a restart re-runs the epoch.
            if backup.in_epoch is not None and backup.in_epoch + 1 > st.epochs_done:
                st.interrupted_in_epoch = backup.in_epoch + 1
            self.log.warning(
                "saving_state_on_sigterm",
                epochs_done=st.epochs_done,
                interrupted_in_epoch=st.interrupted_in_epoch,
            )
            self.backups.save(st, model, f"sigterm-{st.epochs_done:04d}-{int(time.time())}")
            raise
        if not st.finished:  # fit ended without our flag (should not happen): close it
            st.finished = True
            st.stop_reason = self.stop_reason(st.epochs_done)
            self.backups.save(st, model, f"epoch-{st.epochs_done:04d}")

    # -- outputs -------------------------------------------------------------------------

    def finish(self, full: Any, model: Any, work: Path, data_path: dict[str, Any]) -> TrainResult:
        """Write the outputs: the full model (base + head) with the best-val weights of
        `model` (the full one, or the part trained on cached features)."""
        cfg, st, data, runtime = self.cfg, self.state, self.data, self.runtime
        # The final model: best-val weights in a float32, uncompiled copy (portable to CPU).
        with warnings.catch_warnings():  # the checkpoint's optimizer state is not needed
            warnings.simplefilter("ignore")
            model.load_weights(self.backups.best_file)
        if model is not full:
            feature_cache.copy_weights(model, full)
        with dtype_policy("float32"):
            final = model_lib.build_for_config(cfg, data.image_size, load_weights=False)
            model_lib.set_model_weights(final, full.get_weights())
            final.save(work / MODEL_FILE)
        self.telemetry.finish(model.optimizer, final, data.val_paths, self.batch_size)
        history = {"phase": self.phase, **st.history}
        (work / "history.json").write_text(json.dumps(history, indent=2) + "\n")
        phases: list[tuple[str, Any]] = []
        init = self.init.store if self.init is not None else None
        if init is not None and init.exists("history.json"):
            phases.append(("top", get_json(init, "history.json")))
        phases.append((self.phase, history))
        training_curves(
            phases,
            work / "training_curves.png",
            title=f"{cfg.backbone} ({cfg.weights} weights), {data.image_size}px",
        )
        resolved = {
            "phase": self.phase,
            "train": config.to_dict(cfg),
            "image_size": data.image_size,
            "inputs": {"train_data": data.train_uri, "val_data": data.val_uri}
            | ({"init_model": init.uri} if init is not None else {}),
        }
        (work / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")
        rates = [r for r in st.history["images_per_s"] if r > 0]
        # Epoch 1 includes graph tracing: use the median as the throughput figure.
        ips = round(statistics.median(rates), 1) if rates else None
        trainable = int(sum(np.prod(v.shape) for v in model.trainable_weights))
        extra = TrainResult(
            phase=self.phase,
            backbone=cfg.backbone,
            weights=cfg.weights,
            image_size=data.image_size,
            best_val_accuracy=st.best_val_accuracy,
            best_epoch=st.best_epoch,
            epochs_run=st.epochs_done,
            stop_reason=st.stop_reason,
            resumed_from_epoch=self.resumed_from,
            images_per_s=ips,
            train_images=data.train_count,
            val_images=data.val_count,
            class_weights=_by_class(self.class_weight, 4),
            trainable_params=trainable,
            batch_size=self.batch_size,
            mixed_precision=runtime.mixed_precision,
            replicas=runtime.replicas,
            data_path=data_path,
        )
        self.log.info(
            f"{STAGE_OF_PHASE[self.phase]}_done",
            best_val_accuracy=_r(st.best_val_accuracy),
            best_epoch=st.best_epoch,
            epochs_run=st.epochs_done,
            stop_reason=st.stop_reason,
            images_per_s=ips,
            resumed_from_epoch=self.resumed_from,
        )
        return extra


def _cache_fields(cache: CachePlan) -> dict[str, Any]:
    return {
        "features": cache.kind,
        "reason": cache.reason,
        "layer": cache.boundary,
        "extract_seconds": cache.extract_seconds,
    }


def _r(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else round(value, 4)


def _by_class(weights: dict[int, float] | None, digits: int) -> dict[str, float] | None:
    return None if weights is None else {CLASSES[i]: round(w, digits) for i, w in weights.items()}
