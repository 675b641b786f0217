"""The models of a training phase: the full classifier as the phase starts it, and the
model that actually trains (the full one, or the part after the cached frozen layers:
`feature_cache`), with the inputs it trains on.

Phase top: a new classifier (base frozen; trained whole with `weights: none`). Fine-tune:
the top phase's best model with the backbone's last block unfrozen (BatchNorm kept
frozen).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skinlesion import config, feature_cache, logs
from skinlesion import model as model_lib
from skinlesion.classes import NUM_CLASSES
from skinlesion.errors import InputError
from skinlesion.feature_cache import CachePlan
from skinlesion.layout import MODEL_FILE
from skinlesion.manifest import read_result
from skinlesion.results import TrainResult
from skinlesion.storage import Store
from skinlesion.train_data import TrainData
from skinlesion.train_inputs import Inputs, image_records
from skinlesion.train_state import TrainState


@dataclass(frozen=True)
class InitModel:
    """The committed top-phase output that fine-tuning starts from."""

    store: Store
    manifest: dict[str, Any]
    result: TrainResult

    @classmethod
    def read(cls, store: Store) -> InitModel:
        return cls(store, *read_result(store, TrainResult, "init_model"))


def fresh_state(fp: str, phase: str, init: InitModel | None, val_fingerprint: str) -> TrainState:
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


def fresh_model(
    cfg: config.TrainConfig, phase: str, image_size: int, init: InitModel | None, tmp: Path
) -> Any:
    """The full classifier as the phase starts it (not compiled): phase top's new one, or
    fine-tune's from the init model with the last block unfrozen."""
    if phase == "top":
        return model_lib.build_for_config(cfg, image_size)
    assert init is not None
    manifest, uri = init.manifest, init.store.uri
    for key, want in (("backbone", cfg.backbone), ("image_size", image_size)):
        if key in manifest and manifest[key] != want:
            raise InputError(f"init model {uri} has {key} {manifest[key]!r}, this run has {want!r}")
    local = tmp / "init" / MODEL_FILE
    init.store.get_file(MODEL_FILE, local)
    loaded = model_lib.load_model(local)
    model = model_lib.build_for_config(cfg, image_size, load_weights=False)
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
    logs.get().info(
        "unfrozen",
        prefixes=list(prefixes),
        layers=len(unfrozen),
        first=unfrozen[:1],
        last=unfrozen[-1:],
    )
    return model


def phase_models(
    cfg: config.TrainConfig,
    phase: str,
    data: TrainData,
    init: InitModel | None,
    work: Path,
    tmp: Path,
    budget: int,
    workers: int,
    restore: Callable[[TrainState], Any] | None,
    state: TrainState,
) -> tuple[Any, Any, Inputs, CachePlan]:
    """(full model, the model that trains, its inputs, the cache plan). A resumed attempt
    (`restore`) gets the trained model back from its state; the cache plan it recorded is
    recomputed (the same settings give the same plan) and its features extracted again.
    The model that trains is returned uncompiled when fresh."""
    log = logs.get()
    images = (
        image_records(data.train_paths, data.train_count, data.image_size),
        image_records(data.val_paths, data.val_count, data.image_size),
    )
    if restore is not None and state.cache == "off":
        full = restore(state)  # the full model, compiled, with its optimizer state
        cache = CachePlan("off", state.cache_reason)
        return full, full, Inputs(*images, NUM_CLASSES, budget, workers), cache
    full = fresh_model(cfg, phase, data.image_size, init, tmp)
    cache = feature_cache.plan(cfg, phase, full)
    if restore is not None and state.cache and state.cache != cache.kind:
        raise InputError(f"resume state was trained on '{state.cache}', now '{cache.kind}'")
    state.cache, state.cache_reason = cache.kind, cache.reason
    log.info("feature_cache", kind=cache.kind, reason=cache.reason, layer=cache.boundary)
    if cache.cached:
        parts = feature_cache.build_parts(full, cache)
        # Phase top keeps its pooled features as an output; fine-tune's stay in scratch.
        where = (work if phase == "top" else tmp) / "features"
        start = time.monotonic()
        train = feature_cache.extract(parts.extractor, images[0], where, "train")
        val = feature_cache.extract(parts.extractor, images[1], where, "val")
        cache = dataclasses.replace(cache, extract_seconds=round(time.monotonic() - start, 2))
        if phase == "top":
            feature_cache.write_index(where, cache, {"train": train, "val": val})
        inputs, model = Inputs(train, val, NUM_CLASSES, budget, workers), parts.trainable
    else:
        inputs, model = Inputs(*images, NUM_CLASSES, budget, workers), full
    if restore is not None:
        model = restore(state)  # the trained part, with its optimizer state
    return full, model, inputs, cache
