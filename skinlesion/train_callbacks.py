"""The Keras callbacks of a training phase: early stopping on val_loss and on
val_accuracy and the best-val_accuracy checkpoint, all resumable, the per-epoch hook
that logs and backs up, the step progress of each epoch and the telemetry (TensorBoard
events, MLflow metrics) after each backup."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from skinlesion import config
from skinlesion.logs import Progress, context
from skinlesion.obs import mlflow_log
from skinlesion.obs.stage_end import pipeline_run
from skinlesion.obs.tensorboard_log import EventLog, figure_png
from skinlesion.train_state import TrainState


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping whose counters survive a restart (Keras resets them in on_train_begin)."""

    def __init__(self, restore: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._restore = restore or {}

    def on_train_begin(self, logs: Any = None) -> None:
        super().on_train_begin(logs)
        if self._restore:
            self.wait = int(self._restore.get("wait", 0))
            self.best = self._restore.get("best")
            self.best_epoch = int(self._restore.get("best_epoch", 0))

    def snapshot(self) -> dict[str, Any]:
        best = None if self.best is None else float(self.best)
        return {"wait": int(self.wait), "best": best, "best_epoch": int(self.best_epoch)}


# on_epoch(epoch, logs, seconds of the epoch, seconds of its training steps, the model)
EpochHook = Callable[[int, dict[str, Any], float, float, Any], None]


class EpochBackup(keras.callbacks.Callback):
    """Per epoch: times it and hands its figures to `on_epoch` (the trainer's log line,
    history and state backup)."""

    def __init__(self, on_epoch: EpochHook) -> None:
        super().__init__()
        self.on_epoch = on_epoch
        self.started = self.train_done = 0.0
        self.in_epoch: int | None = None

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.in_epoch = epoch
        self.started = time.monotonic()
        self.train_done = 0.0

    def on_test_begin(self, logs: Any = None) -> None:
        if self.in_epoch is not None and not self.train_done:
            self.train_done = time.monotonic()  # end of the training steps of this epoch

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        now = time.monotonic()
        self.on_epoch(
            epoch,
            dict(logs or {}),
            now - self.started,
            (self.train_done or now) - self.started,
            self.model,
        )
        self.in_epoch = None


@dataclass(frozen=True)
class TrainCallbacks:
    """Early stopping and the best-val_accuracy checkpoint, as a resume state left them."""

    stoppers: dict[str, ResumableEarlyStopping]
    checkpoint: Any  # keras.callbacks.ModelCheckpoint: writes the best weights file

    @classmethod
    def restored(
        cls, cfg: config.TrainConfig, state: TrainState, best_file: Path
    ) -> TrainCallbacks:
        es = state.early_stopping
        stoppers = {
            "val_loss": ResumableEarlyStopping(
                es.get("val_loss"), monitor="val_loss", mode="min", patience=cfg.patience_loss
            ),
            "val_accuracy": ResumableEarlyStopping(
                es.get("val_accuracy"),
                monitor="val_accuracy",
                mode="max",
                patience=cfg.patience_accuracy,
            ),
        }
        checkpoint = keras.callbacks.ModelCheckpoint(
            str(best_file),
            monitor="val_accuracy",
            mode="max",
            save_best_only=True,
            save_weights_only=True,
            initial_value_threshold=state.best_val_accuracy,
        )
        return cls(stoppers, checkpoint)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {name: es.snapshot() for name, es in self.stoppers.items()}

    def early_stop(self) -> str:
        """Why early stopping ended training; "" while it has not."""
        for name, es in self.stoppers.items():
            if es.stopped_epoch:
                return f"early stopping on {name} (patience {es.patience})"
        return ""


class StepProgress(keras.callbacks.Callback):
    """Each epoch's training steps on a `Progress`: a bar with the loss on a terminal,
    a progress line at most every 30 s in a pod."""

    async_safe = True  # counts only; Keras may call it from its dispatch threads

    def __init__(self, task: str, epochs: int, steps_per_epoch: int) -> None:
        super().__init__()
        self.task, self.epochs, self.steps = task, epochs, steps_per_epoch
        self.bar: Progress | None = None
        self.lock = threading.Lock()

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.bar = Progress(f"{self.task} epoch {epoch + 1}/{self.epochs}", self.steps, "step")

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        with self.lock:
            if self.bar is None:
                return
            shown = {}
            if self.bar.bar is not None and logs and "loss" in logs:  # a terminal bar only
                shown["loss"] = f"{float(logs['loss']):.4f}"
            self.bar.update(1, **shown)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        with self.lock:
            if self.bar is not None:
                self.bar.close()
                self.bar = None


def learning_rate_at(optimizer: Any, step: int) -> float | None:
    """The optimizer's learning rate after `step` updates (a schedule evaluated there)."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # under a LossScaleOptimizer
    if inner is None:
        return None
    lr = inner.get_config().get("learning_rate")
    if isinstance(lr, dict):
        return float(keras.optimizers.schedules.deserialize(lr)(step))
    return None if lr is None else float(lr)


# Each per-epoch figure of the resume history: (TensorBoard tag, MLflow name after
# `<stage>.`); the learning rate is added as `learning_rate`.
EPOCH_FIGURES = {
    "loss": ("loss/train", "loss"),
    "accuracy": ("accuracy/train", "accuracy"),
    "val_loss": ("loss/val", "val_loss"),
    "val_accuracy": ("accuracy/val", "val_accuracy"),
    "images_per_s": ("images_per_second", "images_per_second"),
    "seconds": ("epoch_seconds", "epoch_seconds"),
}
LEARNING_RATE = "learning_rate"


class TrainTelemetry(keras.callbacks.Callback):
    """Per epoch, after its state backup (it follows `EpochBackup` in the callbacks): the
    epoch's figures from the resume state's history, with the learning rate, as TensorBoard
    scalars (`events`, uploaded) and as MLflow metrics `<stage>.<figure>` with the epoch as
    step. An attempt first replays the epochs its state holds (MLflow: only those missing),
    so no step appears twice after a resume. `finish` adds the confusion matrix image."""

    def __init__(
        self, stage: str, state: TrainState, events: EventLog, steps_per_epoch: int
    ) -> None:
        super().__init__()
        self.stage, self.state, self.events = stage, state, events
        self.steps_per_epoch = steps_per_epoch
        self.run_id = str(context().get("run_id") or "-")
        self.replayed = False

    def _rows(self, indices: range, optimizer: Any) -> list[tuple[int, dict[str, float | None]]]:
        history = self.state.history
        rows = []
        for i in indices:
            epoch = int(history["epoch"][i])
            figures: dict[str, float | None] = {k: history[k][i] for k in EPOCH_FIGURES}
            figures[LEARNING_RATE] = learning_rate_at(optimizer, epoch * self.steps_per_epoch)
            rows.append((epoch, figures))
        return rows

    def _log(self, rows: list[tuple[int, dict[str, float | None]]], replay: bool) -> None:
        def named(figures: dict[str, float | None], which: int) -> dict[str, float | None]:
            return {EPOCH_FIGURES.get(k, (k, k))[which]: v for k, v in figures.items()}

        for epoch, figures in rows:
            self.events.scalars(epoch, named(figures, 0))
        if pipeline_run(self.run_id) and rows:
            mlflow_log.log_epochs(
                self.run_id,
                [(e, {f"{self.stage}.{k}": v for k, v in named(f, 1).items()}) for e, f in rows],
                f"{self.stage}.loss",
                only_missing=replay,
            )

    def replay(self, optimizer: Any) -> None:
        """The epochs this attempt's state already holds (a resume), once."""
        if not self.replayed:
            self.replayed = True
            self._log(self._rows(range(len(self.state.history["epoch"])), optimizer), True)

    def on_train_begin(self, logs: Any = None) -> None:
        self.replay(self.model.optimizer)
        self.events.upload()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        done = len(self.state.history["epoch"])
        if done and self.state.history["epoch"][-1] == epoch + 1:  # backed up by EpochBackup
            self._log(self._rows(range(done - 1, done), self.model.optimizer), False)
            self.events.upload()

    def finish(self, optimizer: Any, final: Any, val_paths: list[Path], batch_size: int) -> None:
        """The confusion matrix of the final model on the val split, at the last epoch; the
        event file is closed (the stage commit uploads it)."""
        from skinlesion.evaluate import predict_shards
        from skinlesion.metrics import confusion_matrix
        from skinlesion.plots.evaluation import confusion_matrix_png

        self.replay(optimizer)
        examples, proba = predict_shards(final, val_paths, batch_size, desc=f"{self.stage} val")
        truth = np.array([e.label for e in examples])
        cm = confusion_matrix(truth, proba.argmax(axis=1))
        png = figure_png(confusion_matrix_png, cm)
        self.events.image_png("confusion_matrix/val", png, self.state.epochs_done)
        self.events.close()
