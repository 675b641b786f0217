"""Resume state of a training stage, backed up under `<out>/state/`.

After every epoch (and on SIGTERM) the stage backs up its model with optimizer
state, history, best-so-far and early-stopping counters with the stage
fingerprint. A restart with the same fingerprint continues from the last
completed epoch; state of another fingerprint is deleted. `state.json` is
written last and names the files it needs, so a crash mid-backup leaves the
previous backup usable.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras

from skinlesion import faults, logs
from skinlesion.manifest import STATE_PREFIX
from skinlesion.storage import Store, get_json, put_json

STATE_JSON = f"{STATE_PREFIX}/state.json"
METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")


@dataclass
class TrainState:
    """What a restart needs; saved as `state/state.json` after the files it names."""

    fingerprint: str
    phase: str
    epochs_done: int = 0
    history: dict[str, list[float]] = field(
        default_factory=lambda: {k: [] for k in ("epoch", *METRICS, "seconds", "images_per_s")}
    )
    best_val_accuracy: float | None = None
    best_epoch: int | None = None  # 1-based within the phase; 0 = the init model
    early_stopping: dict[str, dict[str, Any]] = field(default_factory=dict)
    finished: bool = False
    stop_reason: str = ""
    model_key: str = ""  # state/<tag>.keras: model + optimizer state
    best_key: str = ""  # state/best-<n>.weights.h5
    interrupted_in_epoch: int | None = None  # SIGTERM mid-epoch: weights are partial
    resumes: int = 0
    cache: str = ""  # the feature cache the model trains on (feature_cache.Kind)
    cache_reason: str = ""


class StateBackup:
    """Reads and writes a stage's resume state under `<out>/state/`, with the local
    best-val weights file `best_file` (uploaded when it changed since the last backup)."""

    def __init__(self, out: Store, fp: str, tmp: Path, best_file: Path) -> None:
        self.out, self.fp, self.tmp, self.best_file = out, fp, tmp, best_file
        self.best_changed = False
        self.log = logs.get()

    def load(self) -> TrainState | None:
        if not self.out.exists(STATE_JSON):
            self.discard()  # objects of an attempt killed before its first state.json
            return None
        raw = get_json(self.out, STATE_JSON)
        if not isinstance(raw, dict) or raw.get("fingerprint") != self.fp:
            self.log.warning("stale_state_discarded", reason="other inputs or settings")
            self.discard()
            return None
        known = TrainState.__dataclass_fields__
        state = TrainState(**{k: v for k, v in raw.items() if k in known})
        for key in (state.model_key, state.best_key):
            if key and not self.out.exists(key):
                self.log.warning("stale_state_discarded", reason=f"missing {key}")
                self.discard()
                return None
        return state

    def discard(self) -> None:
        for obj in self.out.list(STATE_PREFIX):
            self.out.delete(obj.key)

    def restore_model(self, state: TrainState) -> Any:
        """The backed-up model (under the strategy scope it is to train in), and the best
        weights file."""
        local = self.tmp / "state" / Path(state.model_key).name
        self.out.get_file(state.model_key, local)
        model = keras.saving.load_model(local)
        if state.best_key:
            self.out.get_file(state.best_key, self.best_file)
        return model

    def save(self, state: TrainState, model: Any, tag: str) -> None:
        """Upload the model (+ the best weights when changed), then state.json, then prune."""
        local = self.tmp / "state" / f"{tag}.keras"
        local.parent.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        model.save(local)
        size = local.stat().st_size
        state.model_key = f"{STATE_PREFIX}/{tag}.keras"
        self.out.put_file(local, state.model_key)
        faults.point("backup.model")
        local.unlink()
        best = self.best_changed and self.best_file.exists()
        if best:
            state.best_key = f"{STATE_PREFIX}/best-{tag}.weights.h5"
            self.out.put_file(self.best_file, state.best_key)
            size += self.best_file.stat().st_size
        state.fingerprint = self.fp
        put_json(self.out, STATE_JSON, asdict(state))
        faults.point("backup.state")
        keep = {STATE_JSON, state.model_key, state.best_key}
        for obj in self.out.list(STATE_PREFIX):
            if obj.key not in keep:
                self.out.delete(obj.key)
        if best:
            self.best_changed = False
        self.log.info(  # a backup of a large model takes a while: say what it took
            "state_saved",
            tag=tag,
            megabytes=round(size / 1e6, 1),
            best_weights=best,
            seconds=round(time.monotonic() - start, 1),
        )
