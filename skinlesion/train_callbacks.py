"""The Keras callbacks of a training phase: early stopping on val_loss and on
val_accuracy and the best-val_accuracy checkpoint, all resumable, and the
per-epoch hook that logs and backs up."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras

from skinlesion import config
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
