"""The trainer of one phase: builds or restores the model, fits it with a state backup
after every epoch, and writes the stage outputs.

Phase top: base frozen (trained whole with `weights: none`), rmsprop. Phase
finetune: the best top model with the backbone's last block unfrozen (BatchNorm
kept frozen), Adam at `finetune_learning_rate`. Both: categorical
cross-entropy, EarlyStopping on val_loss and on val_accuracy, best-val_accuracy
checkpoint; class weights when the training set is not class-balanced by augment.
"""

from __future__ import annotations

import json
import math
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import keras
import numpy as np

from skinlesion import config, faults, logs, shards, train_seeds
from skinlesion import model as model_lib
from skinlesion.classes import CLASSES, NUM_CLASSES
from skinlesion.errors import InputError, Terminated
from skinlesion.layout import MODEL_FILE
from skinlesion.manifest import read_result
from skinlesion.obs.tensorboard_log import EventLog
from skinlesion.plots.training import training_curves
from skinlesion.results import TrainResult
from skinlesion.storage import Store, get_json
from skinlesion.train_callbacks import EpochBackup, StepProgress, TrainCallbacks, TrainTelemetry
from skinlesion.train_data import TrainData, class_weights
from skinlesion.train_runtime import Runtime, dtype_policy
from skinlesion.train_state import METRICS, StateBackup, TrainState

Phase = Literal["top", "finetune"]
STAGE_OF_PHASE: dict[str, str] = {"top": "train", "finetune": "finetune"}


def phase_epochs(cfg: config.TrainConfig, phase: Phase) -> int:
    return cfg.top_epochs if phase == "top" else cfg.finetune_epochs


@dataclass(frozen=True)
class InitModel:
    """The committed top-phase output that fine-tuning starts from."""

    store: Store
    manifest: dict[str, Any]
    result: TrainResult

    @classmethod
    def read(cls, store: Store) -> InitModel:
        return cls(store, *read_result(store, TrainResult, "init_model"))


def fresh_state(fp: str, phase: Phase, init: InitModel | None, val_fingerprint: str) -> TrainState:
    """The state of a phase's first attempt. The fine-tuned model must beat the model it
    starts from (when both were scored on the same val data): that one is best, epoch 0."""
    state = TrainState(fingerprint=fp, phase=phase)
    if init is not None:
        best = init.result.best_val_accuracy
        same_val = init.manifest["inputs"].get("val_data") == val_fingerprint
        if best is not None and same_val:
            state.best_val_accuracy = float(best)
            state.best_epoch = 0
    return state


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
        model.compile(optimizer=opt, loss="categorical_crossentropy", metrics=["accuracy"])

    def fresh_model(self, tmp: Path) -> Any:
        cfg, size = self.cfg, self.data.image_size
        if self.phase == "top":
            model = model_lib.build_for_config(cfg, size)
            self.compile(model)
            return model
        assert self.init is not None
        init, uri = self.init.manifest, self.init.store.uri
        for key, want in (("backbone", cfg.backbone), ("image_size", size)):
            if key in init and init[key] != want:
                raise InputError(f"init model {uri} has {key} {init[key]!r}, this run has {want!r}")
        local = tmp / "init" / MODEL_FILE
        self.init.store.get_file(MODEL_FILE, local)
        loaded = model_lib.load_model(local)
        model = model_lib.build_for_config(cfg, size, load_weights=False)
        try:
            model_lib.set_model_weights(model, loaded.get_weights())
        except ValueError as exc:
            raise InputError(
                f"init model {uri} does not match train settings "
                f"(backbone {cfg.backbone}, dense_units {cfg.dense_units}): {exc}"
            ) from None
        del loaded
        prefixes = model_lib.block_prefixes(cfg.backbone, cfg.finetune_block)
        unfrozen = model_lib.unfreeze_block(model, prefixes)
        self.log.info(
            "unfrozen",
            prefixes=list(prefixes),
            layers=len(unfrozen),
            first=unfrozen[:1],
            last=unfrozen[-1:],
        )
        self.compile(model)
        return model

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
                model = self.backups.restore_model(st)
                log.info(
                    "resuming",
                    epoch=st.epochs_done,
                    epochs=self.total_epochs,
                    best_val_accuracy=_r(st.best_val_accuracy),
                    interrupted_in_epoch=st.interrupted_in_epoch,
                    finished=st.finished,
                )
            else:
                model = self.fresh_model(tmp)
                if st.best_val_accuracy is not None:  # finetune: the init model
                    model.save_weights(best_file)
                    self.backups.best_changed = True  # the first backup stores it
            if not st.finished and st.epochs_done < self.total_epochs:
                self.fit(model)
            if not best_file.exists():  # no epoch had a finite val_accuracy
                model.save_weights(best_file)
        return self.finish(model, work)

    def fit(self, model: Any) -> None:
        cfg, st, data = self.cfg, self.state, self.data
        import tensorflow as tf

        size = data.image_size

        def static(images: Any, labels: Any) -> Any:
            # Static image shapes: the (possibly empty) per-replica pieces of a last, partial
            # batch under MirroredStrategy must still be [n, size, size, 3]; also checks size.
            return tf.ensure_shape(images, [None, size, size, 3]), labels

        epochs = range(st.epochs_done, self.total_epochs)
        train_ds = train_seeds.train_dataset(
            data.train_paths,
            NUM_CLASSES,
            self.batch_size,
            self.steps_per_epoch,
            [train_seeds.epoch_seed(cfg.seed, self.phase, e) for e in epochs],
        ).map(static)
        # A known length spares Keras' "ran out of data" warning and checks the manifest.
        val_ds = (
            shards.dataset(data.val_paths, NUM_CLASSES, self.batch_size)
            .map(static)
            .apply(
                tf.data.experimental.assert_cardinality(math.ceil(data.val_count / self.batch_size))
            )
        )
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

    def finish(self, model: Any, work: Path) -> TrainResult:
        cfg, st, data, runtime = self.cfg, self.state, self.data, self.runtime
        # The final model: best-val weights in a float32, uncompiled copy (portable to CPU).
        with warnings.catch_warnings():  # the checkpoint's optimizer state is not needed
            warnings.simplefilter("ignore")
            model.load_weights(self.backups.best_file)
        with dtype_policy("float32"):
            final = model_lib.build_for_config(cfg, data.image_size, load_weights=False)
            model_lib.set_model_weights(final, model.get_weights())
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


def _r(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else round(value, 4)


def _by_class(weights: dict[int, float] | None, digits: int) -> dict[str, float] | None:
    return None if weights is None else {CLASSES[i]: round(w, digits) for i, w in weights.items()}
