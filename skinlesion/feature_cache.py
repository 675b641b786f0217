"""Frozen layers computed once: which part of the classifier trains on cached features.

A phase trains only some layers; everything before the first trainable one maps an image
to the same tensor every epoch (the training images are fixed: augmentation is offline).
So that tensor is computed once per image and the phase trains only the layers after it:

- phase top, base frozen: the pooled features (`head_pool`'s output); the head trains on
  them ("pooled");
- fine-tune: the output of the block before the trainable one (for ResNets `conv4`'s, the
  input of `conv5_block1`); the last block and the head train on it ("block").

The cache is invalid, and the phase takes the full path, when a layer before the boundary
still changes in training: trainable weights (`weights: none` trains the whole base in
phase top), or random layers (dropout, online augmentation) that run in training mode. The
reason is logged and recorded in the manifest. Either way the stage writes the full model
(base + head): the trained layers' weights are copied back into it by layer name.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from skinlesion import config, logs
from skinlesion import model as model_lib
from skinlesion.train_inputs import LABEL_BYTES, Records

FEATURE_DTYPE = "float16"
FLOAT16_MAX = 65504.0
SHARD_BYTES = 512 * 1024 * 1024  # of one feature file, at most
EXTRACT_BATCH = 64
INDEX = "index.json"

Kind = Literal["pooled", "block", "off"]


@dataclass(frozen=True)
class CachePlan:
    kind: Kind
    reason: str  # why the full path (kind "off"), or what is cached
    boundary: str = ""  # the layer whose output is cached
    extract_seconds: float = 0.0  # of the one pass computing the cache (train + val)

    @property
    def cached(self) -> bool:
        return self.kind != "off"


@dataclass(frozen=True)
class Parts:
    """The models of a cached phase: `extractor` (image -> cached tensor) and `trainable`
    (cached tensor -> class probabilities), sharing their layers with the full model."""

    extractor: Any
    trainable: Any


def _history(tensor: Any) -> tuple[Any, list[Any]]:
    """The operation that produced a symbolic tensor, and that call's input tensors."""
    op, node_index, _ = tensor._keras_history
    return op, list(op._inbound_nodes[node_index].input_tensors)


def _graph(outputs: list[Any]) -> list[Any]:
    """Every symbolic tensor the outputs depend on, each once."""
    out: dict[int, Any] = {}
    todo = list(outputs)
    while todo:
        t = todo.pop()
        if id(t) not in out:
            out[id(t)] = t
            todo += _history(t)[1]
    return list(out.values())


def _produced_by(model: Any, name: str) -> tuple[Any, Any]:
    """The tensor the layer `name` outputs in `model`'s graph, and that call's node."""
    for t in _graph(model.outputs):
        op, node_index, _ = t._keras_history
        if op.name == name:
            return t, op._inbound_nodes[node_index]
    raise ValueError(f"no layer {name} in the graph of {model.name}")


def _base_call(model: Any) -> tuple[Any, Any]:
    """The backbone's input tensor in the classifier's graph (the preprocessed image) and
    the `training` argument it is called with (False: inference; None: follows fit)."""
    _, node = _produced_by(model, model_lib.get_base(model).name)
    return node.input_tensors[0], node.arguments.kwargs.get("training")


def _random(op: Any) -> bool:
    return bool(getattr(op, "_seed_generators", None))


def _upstream_ops(tensors: list[Any], stop: Any = None) -> list[Any]:
    """Every operation the tensors depend on (not past `stop`), each once."""
    ops: dict[int, Any] = {}
    done: set[int] = set()  # tensors expanded (residual graphs reach one by many paths)
    todo = list(tensors)
    while todo:
        t = todo.pop()
        if id(t) in done or (stop is not None and t is stop):
            continue
        done.add(id(t))
        op, inputs = _history(t)
        ops.setdefault(id(op), op)
        todo += inputs
    return list(ops.values())


def find_boundary(base: Any) -> tuple[Any | None, list[Any], str]:
    """The one frozen tensor of the base that its trainable layers start from, and the
    operations before it; (None, [], why not) when there is no single such tensor."""
    tainted: dict[int, bool] = {}  # tensor id -> depends on a layer with trainable weights
    seen: set[int] = set()  # each tensor expanded once (residual graphs share inputs)
    stack: list[tuple[Any, bool]] = [(t, False) for t in base.outputs]
    while stack:  # post-order: a tensor after all of its inputs
        t, expanded = stack.pop()
        op, inputs = _history(t)
        if not expanded:
            if id(t) not in seen:
                seen.add(id(t))
                stack.append((t, True))
                stack += [(i, False) for i in inputs if id(i) not in seen]
            continue
        trains = bool(getattr(op, "trainable_weights", None))
        tainted[id(t)] = trains or any(tainted[id(i)] for i in inputs)
    frontier: dict[int, Any] = {}
    for t in _graph(base.outputs):
        if tainted.get(id(t)):
            for i in _history(t)[1]:
                if not tainted[id(i)]:
                    frontier[id(i)] = i
    if not frontier:
        return None, [], "no trainable layer in the backbone"
    if len(frontier) > 1:
        names = sorted(_history(t)[0].name for t in frontier.values())
        return None, [], f"the trainable layers start from {len(names)} tensors ({names})"
    (boundary,) = frontier.values()
    upstream = _upstream_ops([boundary])
    if not any(getattr(op, "weights", None) for op in upstream):
        return None, [], "the backbone trains from its first layers: nothing worth caching"
    return boundary, upstream, ""


def plan(cfg: config.TrainConfig, phase: str, model: Any) -> CachePlan:
    """Whether (and what) `phase` caches for the classifier `model` (frozen as the phase
    trains it)."""
    if not cfg.cache_features:
        return CachePlan("off", "train.cache_features is false")
    pre, training = _base_call(model)
    augmenting = [op.name for op in _upstream_ops([pre]) if _random(op)]
    if augmenting:
        return CachePlan(
            "off", f"random layers before the backbone (online augmentation): {augmenting}"
        )
    base = model_lib.get_base(model)
    if phase == "top":
        if base.trainable_weights:
            return CachePlan(
                "off",
                "the backbone trains in phase top (train.weights is 'none'): its features "
                "change every step",
            )
        return CachePlan("pooled", "frozen backbone: pooled features computed once", "head_pool")
    boundary, upstream, why = find_boundary(base)
    if boundary is None:
        return CachePlan("off", why)
    if training is not False:  # the base runs in training mode: random layers are live
        live = [op.name for op in upstream if _random(op)]
        if live:
            return CachePlan("off", f"random layers before the trainable block: {live}")
    name = _history(boundary)[0].name
    return CachePlan("block", f"frozen layers up to {name} computed once", name)


def build_parts(model: Any, cache: CachePlan) -> Parts:
    """The extractor and the trainable part of `model` for a cached plan (shared layers:
    training the part trains the model's own layers)."""
    import keras

    pre, training = _base_call(model)
    if cache.kind == "pooled":
        extractor = keras.Model(model.inputs, _produced_by(model, "head_pool")[0])
        x = inputs = keras.Input(extractor.output.shape[1:], name="pooled")
        head: tuple[str, ...] = ("head_dense", "head_dropout", "predictions")
    else:
        base = model_lib.get_base(model)
        boundary, _, _ = find_boundary(base)
        assert boundary is not None, "build_parts of a plan that is not cached"
        lower = keras.Model(base.inputs, boundary, name="frozen_layers")
        extractor = keras.Model(model.inputs, lower(pre, training=training))
        upper = keras.Model(boundary, base.output, name="trained_layers")
        inputs = keras.Input(boundary.shape[1:], name=cache.boundary)
        x = upper(inputs, training=training)
        head = model_lib.HEAD_LAYERS
    for name in head:
        x = model.get_layer(name)(x)
    return Parts(extractor, keras.Model(inputs, x, name=f"{model.name}_{cache.kind}"))


def _leaves(model: Any) -> dict[str, Any]:
    import keras

    layers = model._flatten_layers(include_self=False, recursive=True)
    return {layer.name: layer for layer in layers if not isinstance(layer, keras.Model)}


def copy_weights(source: Any, dest: Any) -> int:
    """Set every layer of `dest` that `source` has (same name) to `source`'s weights;
    returns how many layers were copied. Every trainable layer of `source` must land."""
    into = _leaves(dest)
    copied = 0
    for name, layer in _leaves(source).items():
        if not layer.weights:
            continue
        if name not in into:
            if layer.trainable_weights:
                raise ValueError(f"layer {name} of {source.name} is not in {dest.name}")
            continue
        into[name].set_weights(layer.get_weights())
        copied += 1
    return copied


def extract(extractor: Any, records: Records, directory: Path, split: str) -> Records:
    """Run `extractor` once over every sample of `records` and write its outputs as float16
    raw records (a uint16 label, then the tensor) into `<split>-NNNNN.f16` files of at most
    SHARD_BYTES: streamed batch by batch, memory bounded by a batch. Values beyond float16's
    range are saturated (and counted in the log)."""
    log = logs.get()
    directory.mkdir(parents=True, exist_ok=True)
    shape = tuple(int(d) for d in extractor.output.shape[1:])
    record = np.dtype([("label", "<u2"), ("x", "<f2", shape)])
    assert record.itemsize == LABEL_BYTES + int(np.prod(shape)) * 2
    per_file = max(1, SHARD_BYTES // record.itemsize)
    files: list[Path] = []
    written = saturated = 0
    start = time.monotonic()
    batches = records.ordered().batch(EXTRACT_BATCH).prefetch(2)
    total = math.ceil(records.count / EXTRACT_BATCH)
    step = _compiled(extractor, records)
    out = None
    try:
        for xs, ys_t in logs.progress(batches, total, f"features {split}"):
            values = np.asarray(step(xs), dtype=np.float32)
            ys = ys_t.numpy()
            saturated += int(np.count_nonzero(np.abs(values) > FLOAT16_MAX))
            rows = np.empty(len(ys), dtype=record)
            rows["label"] = ys
            rows["x"] = np.clip(values, -FLOAT16_MAX, FLOAT16_MAX)
            at = 0
            while at < len(rows):  # split the batch where a file fills up
                if out is None or written % per_file == 0:
                    if out is not None:
                        out.close()
                    files.append(directory / f"{split}-{len(files):05d}.f16")
                    out = files[-1].open("wb")
                take = min(len(rows) - at, per_file - written % per_file)
                out.write(rows[at : at + take].tobytes())
                at += take
                written += take
    finally:
        if out is not None:
            out.close()
    if written != records.count:
        raise ValueError(f"extracted {written} {split} samples, {records.count} listed")
    seconds = time.monotonic() - start
    log.info(
        "features_extracted",
        split=split,
        images=written,
        shape=list(shape),
        megabytes=round(written * record.itemsize / 1e6, 1),
        seconds=round(seconds, 1),
        images_per_s=round(written / seconds, 1) if seconds > 0 else None,
        saturated_values=saturated,
    )
    return Records(tuple(files), written, shape, FEATURE_DTYPE, "raw")


def _compiled(extractor: Any, records: Records) -> Any:
    """The extractor as one graph for any batch size (traced once: a ResNet152 trace costs
    seconds, and a last, smaller batch would trace it again)."""
    import tensorflow as tf

    key = id(extractor)
    if key not in _COMPILED:
        spec = tf.TensorSpec([None, *records.shape], records.dtype)
        _COMPILED.clear()  # one extractor at a time
        _COMPILED[key] = tf.function(
            lambda x: extractor(x, training=False), input_signature=[spec], reduce_retracing=True
        )
    return _COMPILED[key]


_COMPILED: dict[int, Any] = {}


def write_index(directory: Path, cache: CachePlan, splits: dict[str, Records]) -> None:
    """`index.json` beside the feature files: what they hold and how to read them."""
    index = {
        "kind": cache.kind,
        "layer": cache.boundary,
        "dtype": FEATURE_DTYPE,
        "record": f"uint16 label (little-endian), then the {FEATURE_DTYPE} tensor",
        "splits": {
            name: {
                "shape": list(r.shape),
                "files": [{"file": p.name, "count": _count(p, r)} for p in r.files],
            }
            for name, r in splits.items()
        },
    }
    (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _count(path: Path, records: Records) -> int:
    return path.stat().st_size // (LABEL_BYTES + records.sample_bytes)
