"""Train (phase top) and fine-tune (phase finetune) stages, preemption-safe.

Phase top: base frozen (trained whole with `weights: none`), rmsprop. Phase
finetune: the best top model with the backbone's last block unfrozen (BatchNorm
kept frozen), Adam at `finetune_learning_rate`. Both: categorical
cross-entropy, EarlyStopping on val_loss and on val_accuracy, best-val_accuracy
checkpoint; class weights when the training set is not class-balanced by augment.

Resume: after every epoch (and on SIGTERM) the stage backs up its model with
optimizer state, history, best-so-far and early-stopping counters under
`<out>/state/` with the stage fingerprint. A restart with the same fingerprint
continues from the last completed epoch; state of another fingerprint is deleted.
`state.json` is written last and names the files it needs, so a crash mid-backup
leaves the previous backup usable.

Hardware: mixed precision when a GPU is visible (`mixed_precision: auto`), and
`tf.distribute.MirroredStrategy` over all GPUs when there are several;
`batch_size` is the global batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import keras
import numpy as np

from skinlesion import config, logs, shards
from skinlesion import model as model_lib
from skinlesion.classes import CLASSES, NUM_CLASSES
from skinlesion.errors import InputError, Terminated
from skinlesion.manifest import (
    STATE_PREFIX,
    commit_stage,
    fingerprint,
    input_fingerprints,
    require_manifest,
    scratch_dir,
)
from skinlesion.plots.training import training_curves
from skinlesion.storage import Store, get_json, put_json

Phase = Literal["top", "finetune"]
STAGE_OF_PHASE: dict[str, str] = {"top": "train", "finetune": "finetune"}
STATE_JSON = f"{STATE_PREFIX}/state.json"
METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")
BEST_CKPT = "checkpoints/best.weights.h5"  # in the stage output: the best-val weights


# --- runtime: devices, precision, distribution ---------------------------------------------


@dataclass(frozen=True)
class Runtime:
    strategy: Any
    gpus: int
    mixed_precision: bool

    @property
    def replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)


def setup_runtime(cfg: config.TrainConfig) -> Runtime:
    """Pick precision and distribution from the visible GPUs (sets the global dtype policy)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        with contextlib.suppress(RuntimeError):  # already initialised in this process
            tf.config.experimental.set_memory_growth(gpu, True)
    mixed = cfg.mixed_precision == "on" or (cfg.mixed_precision == "auto" and bool(gpus))
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    strategy = tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    return Runtime(strategy=strategy, gpus=len(gpus), mixed_precision=mixed)


# --- resume state -------------------------------------------------------------------------


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


class StateBackup:
    """Reads and writes a stage's resume state under `<out>/state/`."""

    def __init__(self, out: Store, fp: str, tmp: Path) -> None:
        self.out, self.fp, self.tmp = out, fp, tmp
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

    def fetch(self, key: str) -> Path:
        local = self.tmp / "state" / Path(key).name
        self.out.get_file(key, local)
        return local

    def save(self, state: TrainState, model: Any, best_file: Path | None, tag: str) -> None:
        """Upload the model (+ best weights when new), then state.json, then prune."""
        local = self.tmp / "state" / f"{tag}.keras"
        local.parent.mkdir(parents=True, exist_ok=True)
        model.save(local)
        state.model_key = f"{STATE_PREFIX}/{tag}.keras"
        self.out.put_file(local, state.model_key)
        local.unlink()
        if best_file is not None:
            state.best_key = f"{STATE_PREFIX}/best-{tag}.weights.h5"
            self.out.put_file(best_file, state.best_key)
        state.fingerprint = self.fp
        put_json(self.out, STATE_JSON, asdict(state))
        keep = {STATE_JSON, state.model_key, state.best_key}
        for obj in self.out.list(STATE_PREFIX):
            if obj.key not in keep:
                self.out.delete(obj.key)


# --- callbacks ----------------------------------------------------------------------------


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


class EpochBackup(keras.callbacks.Callback):
    """Per epoch: one log line with the figures, history, and a state backup to the store."""

    def __init__(self, trainer: _Trainer) -> None:
        super().__init__()
        self.trainer = trainer
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
        self.trainer.epoch_done(
            epoch, dict(logs or {}), now - self.started, (self.train_done or now) - self.started
        )
        self.in_epoch = None


# --- the stage ----------------------------------------------------------------------------


@dataclass
class _Data:
    train_paths: list[Path]
    val_paths: list[Path]
    train_count: int
    val_count: int
    image_size: int
    train_manifest: dict[str, Any]
    label_counts: list[int]


def _shard_count(manifest: dict[str, Any], split: str) -> int:
    return sum(int(s["count"]) for s in shards.split_shards(manifest, split))


def _label_counts(paths: list[Path]) -> list[int]:
    labels = shards.labels(paths)
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise InputError(f"training labels out of range 0..{NUM_CLASSES - 1}")
    return [int(n) for n in np.bincount(labels.astype(np.int64), minlength=NUM_CLASSES)]


def _image_size(train_manifest: dict[str, Any], val_manifest: dict[str, Any], sample: Path) -> int:
    sizes = {int(m["image_size"]) for m in (val_manifest, train_manifest) if m.get("image_size")}
    if len(sizes) > 1:
        raise InputError(f"train and val data have different image sizes: {sorted(sizes)}")
    if sizes:
        return sizes.pop()
    import tensorflow as tf

    first = next(shards.iter_examples([sample]))
    return int(tf.io.decode_jpeg(first.jpeg).shape[0])


def balanced_class_weights(counts: list[int]) -> dict[int, float]:
    """sklearn's "balanced": n / (classes present * n_c), for the classes present."""
    present = [c for c in counts if c > 0]
    total = sum(present)
    return {i: total / (len(present) * c) for i, c in enumerate(counts) if c > 0}


class _Trainer:
    def __init__(
        self,
        cfg: config.TrainConfig,
        phase: Phase,
        train_data: Store,
        val_data: Store,
        out: Store,
        init_model: Store | None,
        fp: str,
        val_fingerprint: str = "",
    ) -> None:
        self.cfg, self.phase = cfg, phase
        self.train_data, self.val_data, self.out, self.init_model = (
            train_data,
            val_data,
            out,
            init_model,
        )
        self.fp = fp
        self.val_fingerprint = val_fingerprint
        self.log = logs.get().bind(phase=phase)
        self.total_epochs = cfg.top_epochs if phase == "top" else cfg.finetune_epochs
        self.state = TrainState(fingerprint=fp, phase=phase)
        self.model: Any = None
        self.checkpoint: Any = None
        self.stoppers: dict[str, ResumableEarlyStopping] = {}
        self.best_dirty = False  # the best-weights file changed since the last backup
        self.steps_per_epoch = 0
        self.batch_size = cfg.batch_size  # global; rounded to a multiple of the replicas
        self.ckpt_path = Path(BEST_CKPT)
        self.backups: StateBackup | None = None

    # -- data ----------------------------------------------------------------------------

    def load_data(self, tmp: Path) -> _Data:
        train_paths, train_manifest = shards.fetch_split(self.train_data, "train", tmp / "train")
        val_paths, val_manifest = shards.fetch_split(self.val_data, "val", tmp / "val")
        counts = _label_counts(train_paths)
        return _Data(
            train_paths=train_paths,
            val_paths=val_paths,
            train_count=_shard_count(train_manifest, "train"),
            val_count=_shard_count(val_manifest, "val"),
            image_size=_image_size(train_manifest, val_manifest, val_paths[0]),
            train_manifest=train_manifest,
            label_counts=counts,
        )

    def class_weights(self, data: _Data) -> dict[int, float] | None:
        mode = self.cfg.class_weights
        if mode == "auto":
            mode = "none" if data.train_manifest.get("stage") == "augment" else "balanced"
        return balanced_class_weights(data.label_counts) if mode == "balanced" else None

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

    def init_manifest(self) -> dict[str, Any]:
        assert self.init_model is not None
        return require_manifest(self.init_model, "init_model")

    def fresh_model(self, data: _Data, tmp: Path) -> Any:
        cfg = self.cfg
        if self.phase == "top":
            model = model_lib.build_for_config(cfg, data.image_size)
            self.compile(model)
            return model
        assert self.init_model is not None
        init = self.init_manifest()
        for key, want in (("backbone", cfg.backbone), ("image_size", data.image_size)):
            if key in init and init[key] != want:
                raise InputError(
                    f"init model {self.init_model.uri} has {key} {init[key]!r}, "
                    f"this run has {want!r}"
                )
        local = tmp / "init" / "model.keras"
        self.init_model.get_file("model.keras", local)
        loaded = model_lib.load_model(local)
        model = model_lib.build_for_config(cfg, data.image_size, load_weights=False)
        try:
            model_lib.set_model_weights(model, loaded.get_weights())
        except ValueError as exc:
            raise InputError(
                f"init model {self.init_model.uri} does not match train settings "
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
        # The fine-tuned model must beat the model it starts from (when both were scored
        # on the same val data): seed the checkpoint with it.
        best = init.get("best_val_accuracy")
        same_val = init.get("inputs", {}).get("val_data") == self.val_fingerprint
        if isinstance(best, int | float) and same_val:
            self.state.best_val_accuracy = float(best)
            self.state.best_epoch = 0
        return model

    # -- per epoch -----------------------------------------------------------------------

    def epoch_done(self, epoch: int, logs_: dict[str, Any], seconds: float, train_s: float) -> None:
        st = self.state
        steps = self.steps_per_epoch
        ips = steps * self.batch_size / train_s if train_s > 0 else 0.0
        st.history["epoch"].append(epoch + 1)
        for key in METRICS:
            st.history[key].append(float(logs_.get(key, float("nan"))))
        st.history["seconds"].append(round(seconds, 2))
        st.history["images_per_s"].append(round(ips, 1))
        st.epochs_done = epoch + 1
        st.interrupted_in_epoch = None
        best = self.checkpoint.best  # ModelCheckpoint wrote the file if this epoch is better
        if best is not None and (st.best_val_accuracy is None or best > st.best_val_accuracy):
            st.best_val_accuracy = float(best)
            st.best_epoch = epoch + 1
            self.best_dirty = True
        st.early_stopping = {name: es.snapshot() for name, es in self.stoppers.items()}
        if any(es.stopped_epoch for es in self.stoppers.values()) or epoch + 1 >= self.total_epochs:
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
        self.backup(f"epoch-{epoch + 1:04d}")

    def stop_reason(self, epochs_done: int) -> str:
        for name, es in self.stoppers.items():
            if es.stopped_epoch:
                return f"early stopping on {name} (patience {es.patience})"
        return f"reached {epochs_done} epochs" if epochs_done >= self.total_epochs else ""

    def backup(self, tag: str) -> None:
        best_file = self.ckpt_path if self.best_dirty and self.ckpt_path.exists() else None
        assert self.backups is not None
        self.backups.save(self.state, self.model, best_file, tag)
        if best_file is not None:
            self.best_dirty = False

    # -- the run -------------------------------------------------------------------------

    def run(self, work: Path) -> dict[str, Any]:
        if self.total_epochs < 1:
            raise InputError(f"train.{self.phase}_epochs is 0: nothing to train")
        previous_policy = keras.mixed_precision.global_policy()
        with scratch_dir("skinlesion-train-") as tmp:
            try:
                return self._run(work, tmp)
            finally:
                keras.mixed_precision.set_global_policy(previous_policy)

    def _run(self, work: Path, tmp: Path) -> dict[str, Any]:
        cfg, log = self.cfg, self.log
        runtime = setup_runtime(cfg)  # before any TF op initialises the GPUs
        data = self.load_data(tmp / "data")
        class_weight = self.class_weights(data)
        # The global batch, split evenly over the replicas (Keras builds a distributed model
        # from the mean of the first batch's per-replica pieces: they must have one shape).
        self.batch_size = math.ceil(cfg.batch_size / runtime.replicas) * runtime.replicas
        if self.batch_size != cfg.batch_size:
            log.warning(
                "batch_size_rounded",
                batch_size=cfg.batch_size,
                to=self.batch_size,
                replicas=runtime.replicas,
            )
        self.steps_per_epoch = cfg.steps_per_epoch or math.ceil(data.train_count / self.batch_size)
        self.ckpt_path = work / BEST_CKPT
        self.ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        self.backups = StateBackup(self.out, self.fp, tmp)
        resumed = self.backups.load()
        keras.utils.set_random_seed(cfg.seed)  # the initial weights of new layers
        log.info(
            "train_start",
            backbone=cfg.backbone,
            weights=cfg.weights,
            image_size=data.image_size,
            train_images=data.train_count,
            val_images=data.val_count,
            train_labels=dict(zip(CLASSES, data.label_counts, strict=True)),
            class_weights=None
            if class_weight is None
            else {CLASSES[i]: round(w, 3) for i, w in class_weight.items()},
            batch_size=self.batch_size,
            steps_per_epoch=self.steps_per_epoch,
            epochs=self.total_epochs,
            gpus=runtime.gpus,
            replicas=runtime.replicas,
            mixed_precision=runtime.mixed_precision,
        )
        with runtime.strategy.scope():
            if resumed is not None:
                self.state = resumed
                self.state.resumes += 1
                self.model = keras.saving.load_model(self.backups.fetch(resumed.model_key))
                if resumed.best_key:
                    self.out.get_file(resumed.best_key, self.ckpt_path)
                log.info(
                    "resuming",
                    epoch=resumed.epochs_done,
                    epochs=self.total_epochs,
                    best_val_accuracy=_r(resumed.best_val_accuracy),
                    interrupted_in_epoch=resumed.interrupted_in_epoch,
                    finished=resumed.finished,
                )
            else:
                self.model = self.fresh_model(data, tmp)
                if self.state.best_val_accuracy is not None:  # finetune: the init model
                    self.model.save_weights(self.ckpt_path)
                    self.best_dirty = True  # the first backup stores it
            resumed_from = resumed.epochs_done if resumed is not None else None
            if not self.state.finished and self.state.epochs_done < self.total_epochs:
                self.fit(data, class_weight, runtime)
            if not self.ckpt_path.exists():  # no epoch had a finite val_accuracy
                self.model.save_weights(self.ckpt_path)
        return self.finish(work, data, runtime, resumed_from, class_weight)

    def fit(self, data: _Data, class_weight: dict[int, float] | None, runtime: Runtime) -> None:
        cfg, st = self.cfg, self.state
        keras.utils.set_random_seed(cfg.seed + st.epochs_done)
        import tensorflow as tf

        size = data.image_size

        def static(images: Any, labels: Any) -> Any:
            # Static image shapes: the (possibly empty) per-replica pieces of a last, partial
            # batch under MirroredStrategy must still be [n, size, size, 3]; also checks size.
            return tf.ensure_shape(images, [None, size, size, 3]), labels

        train_ds = shards.dataset(
            data.train_paths,
            NUM_CLASSES,
            self.batch_size,
            shuffle=True,
            seed=cfg.seed + st.epochs_done,
            repeat=True,
        ).map(static)
        # A known length spares Keras' "ran out of data" warning and checks the manifest.
        val_ds = (
            shards.dataset(data.val_paths, NUM_CLASSES, self.batch_size)
            .map(static)
            .apply(
                tf.data.experimental.assert_cardinality(math.ceil(data.val_count / self.batch_size))
            )
        )
        es = st.early_stopping
        self.stoppers = {
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
        self.checkpoint = keras.callbacks.ModelCheckpoint(
            str(self.ckpt_path),
            monitor="val_accuracy",
            mode="max",
            save_best_only=True,
            save_weights_only=True,
            initial_value_threshold=st.best_val_accuracy,
        )
        backup = EpochBackup(self)
        try:
            self.model.fit(
                train_ds,
                validation_data=val_ds,
                epochs=self.total_epochs,
                initial_epoch=st.epochs_done,
                steps_per_epoch=self.steps_per_epoch,
                class_weight=class_weight,
                callbacks=[*self.stoppers.values(), self.checkpoint, backup],
                verbose=1 if logs.is_terminal() else 0,
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
            self.backup(f"sigterm-{st.epochs_done:04d}-{int(time.time())}")
            raise
        if not st.finished:  # fit ended without our flag (should not happen): close it
            st.finished = True
            st.stop_reason = self.stop_reason(st.epochs_done)
            self.backup(f"epoch-{st.epochs_done:04d}")

    # -- outputs -------------------------------------------------------------------------

    def finish(
        self,
        work: Path,
        data: _Data,
        runtime: Runtime,
        resumed_from: int | None,
        class_weight: dict[int, float] | None,
    ) -> dict[str, Any]:
        cfg, st = self.cfg, self.state
        # The final model: best-val weights in a float32, uncompiled copy (portable to CPU).
        with warnings.catch_warnings():  # the checkpoint's optimizer state is not needed
            warnings.simplefilter("ignore")
            self.model.load_weights(self.ckpt_path)
        weights = self.model.get_weights()
        keras.mixed_precision.set_global_policy("float32")
        final = model_lib.build_for_config(cfg, data.image_size, load_weights=False)
        model_lib.set_model_weights(final, weights)
        final.save(work / "model.keras")
        history = {"phase": self.phase, **st.history}
        (work / "history.json").write_text(json.dumps(history, indent=2) + "\n")
        phases: list[tuple[str, Any]] = []
        init = self.init_model
        if self.phase == "finetune" and init is not None and init.exists("history.json"):
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
            "inputs": {"train_data": self.train_data.uri, "val_data": self.val_data.uri}
            | ({"init_model": self.init_model.uri} if self.init_model is not None else {}),
        }
        (work / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")
        rates = [r for r in st.history["images_per_s"] if r > 0]
        # Epoch 1 includes graph tracing: use the median as the throughput figure.
        ips = round(statistics.median(rates), 1) if rates else None
        trainable = int(sum(np.prod(v.shape) for v in self.model.trainable_weights))
        extra = {
            "phase": self.phase,
            "backbone": cfg.backbone,
            "weights": cfg.weights,
            "image_size": data.image_size,
            "best_val_accuracy": st.best_val_accuracy,
            "best_epoch": st.best_epoch,
            "epochs_run": st.epochs_done,
            "stop_reason": st.stop_reason,
            "resumed_from_epoch": resumed_from,
            "images_per_s": ips,
            "train_images": data.train_count,
            "val_images": data.val_count,
            "class_weights": None
            if class_weight is None
            else {CLASSES[i]: round(w, 4) for i, w in class_weight.items()},
            "trainable_params": trainable,
            "batch_size": self.batch_size,
            "mixed_precision": runtime.mixed_precision,
            "replicas": runtime.replicas,
        }
        self.log.info(
            f"{STAGE_OF_PHASE[self.phase]}_done",
            best_val_accuracy=_r(st.best_val_accuracy),
            best_epoch=st.best_epoch,
            epochs_run=st.epochs_done,
            stop_reason=st.stop_reason,
            images_per_s=ips,
            resumed_from_epoch=resumed_from,
        )
        return extra


def _r(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else round(value, 4)


def run_train(
    cfg: config.TrainConfig,
    phase: Phase,
    train_data: Store,
    val_data: Store,
    out: Store,
    init_model: Store | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Train one phase and commit `model.keras`, history, curves and config under `out`."""
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
    trainer = _Trainer(cfg, phase, train_data, val_data, out, init, fp, inputs["val_data"])
    # Training keeps resume state under out/state/ while it runs: claim the prefix first.
    return commit_stage(
        stage, out, settings, inputs, trainer.run, force, input_uris=names, claim_first=True
    )
