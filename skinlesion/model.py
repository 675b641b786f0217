"""The classifier: a keras.applications backbone plus the reference head.

    input (float32, 0..255, H x W x 3)
      -> the backbone's own preprocess_input (inside the model, saved with it)
      -> backbone, include_top=False
      -> GlobalAveragePooling2D -> Dense(dense_units, relu) -> Dropout -> Dense(7, softmax)

Preprocessing per backbone: ResNets use caffe mode (RGB->BGR, ImageNet mean
subtracted) as graph ops before the base; MobileNetV3 and EfficientNet carry
their preprocessing as layers inside the base (Rescaling, and Normalization
for EfficientNet), so their `preprocess_input` is a pass-through. The model is
built from built-in layers and ops only: `keras.saving.load_model` reads it
without custom objects.

Weights (`train.weights`): "imagenet" (Keras download), "none" (random; the
whole base is trained, with BatchNorm in training mode) or the store URI of a
`.weights.h5` file of the base alone (air-gapped clusters; write one with
`save_base_weights` / `python -m skinlesion.model mirror ...`, which record the backbone
in the file). A file that does not fit is refused naming both backbones: the recorded
one, or else the known backbone it does load into.

Fine-tuning unfreezes the backbone's last block, selected by layer-name
prefixes (skinlesion/backbones.py); BatchNorm layers stay frozen, hence in inference mode.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from skinlesion import logs
from skinlesion.backbones import BACKBONES, Backbone
from skinlesion.classes import NUM_CLASSES
from skinlesion.config import TrainConfig
from skinlesion.errors import InputError, SkinlesionError
from skinlesion.storage import Store, open_store

SCRATCH_BN_MOMENTUM = 0.9  # BatchNorm momentum of a base trained from random weights
HEAD_LAYERS = ("head_pool", "head_dense", "head_dropout", "predictions")

# EfficientNet built with weights="imagenet" gets an extra Rescaling after its
# Normalization layer (keras issue tensorflow#49930); a base built without it and loaded
# from a mirrored ImageNet file gets the same effect through the Normalization variance.
_IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)
BACKBONE_ATTR = "skinlesion_backbone"  # HDF5 attribute: the backbone a weights file holds
_PROBE_SIZE = 32  # input side for building backbones to identify a weights file


def _keras() -> Any:
    import keras

    return keras


def backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise InputError(f"unknown backbone '{name}' (known: {', '.join(BACKBONES)})") from None


def build_base(name: str, image_size: int, weights: str | None = None) -> Any:
    """The backbone alone (include_top=False); weights None or "imagenet" (download)."""
    keras = _keras()
    spec = backbone(name)
    ctor = getattr(keras.applications, spec.constructor)
    return ctor(include_top=False, weights=weights, input_shape=(image_size, image_size, 3))


def build_model(
    name: str,
    image_size: int,
    *,
    dense_units: int = 1000,
    dropout: float = 0.25,
    base_weights: str | None = None,
    base_bn_training: bool = False,
    num_classes: int = NUM_CLASSES,
) -> Any:
    """The full classifier with a fresh head; the base as `build_base` makes it.

    `base_bn_training=False` calls the base with training=False (BatchNorm always in
    inference mode, the transfer-learning rule); True lets BatchNorm follow the training
    flag, which a randomly initialised base needs to learn its statistics.
    """
    keras = _keras()
    layers = keras.layers
    spec = backbone(name)
    base = build_base(name, image_size, base_weights)
    preprocess = getattr(keras.applications, spec.module).preprocess_input
    inputs = keras.Input((image_size, image_size, 3), name="image")  # float 0..255
    x = preprocess(inputs)
    x = base(x, training=None if base_bn_training else False)
    x = layers.GlobalAveragePooling2D(name="head_pool")(x)
    x = layers.Dense(dense_units, activation="relu", name="head_dense")(x)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    # float32 softmax even under mixed precision (numerically stable probabilities).
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="predictions")(
        x
    )
    return keras.Model(inputs, outputs, name=f"skinlesion_{name}")


def build_for_config(cfg: TrainConfig, image_size: int, load_weights: bool = True) -> Any:
    """The classifier `cfg` describes, ready for phase top.

    imagenet / URI: pretrained base, frozen. none: random base, trainable (with a
    warning: freezing random features would leave only the head to learn).
    `load_weights=False` builds the same architecture without fetching any weights
    (to receive the weights of a saved model).
    """
    uri = cfg.weights not in ("imagenet", "none")
    scratch = cfg.weights == "none"
    try:
        model = build_model(
            cfg.backbone,
            image_size,
            dense_units=cfg.dense_units,
            dropout=cfg.dropout,
            base_weights="imagenet" if cfg.weights == "imagenet" and load_weights else None,
            base_bn_training=scratch,
        )
    except SkinlesionError:
        raise
    except Exception as exc:  # keras raises a bare Exception when the download fails
        if cfg.weights != "imagenet" or not load_weights:
            raise
        raise SkinlesionError(
            f"cannot download ImageNet weights for {cfg.backbone} ({exc}); on a cluster "
            "without internet mirror them to the store and pass --weights <URI>.weights.h5"
        ) from None
    if uri and load_weights:
        load_base_weights(get_base(model), cfg.weights)
    if scratch:
        # MobileNetV3's BatchNorm momentum (0.999) needs thousands of steps before its
        # moving statistics fit a random base; 0.9 makes them usable after a few dozen.
        for layer in get_base(model).layers:
            if _is_batchnorm(layer):
                layer.momentum = SCRATCH_BN_MOMENTUM
        if load_weights:
            logs.get().warning(
                "random_weights",
                message="train.weights is 'none': the backbone starts from random weights "
                "and is trained whole in phase top (expect lower accuracy than ImageNet)",
                backbone=cfg.backbone,
            )
        train_whole_base(model)
    else:
        freeze_base(model)
    return model


def set_model_weights(model: Any, weights: list[Any]) -> None:
    """`model.set_weights` plus the refresh Normalization layers need (EfficientNet's
    mean/variance are cached at build; Keras refreshes them only when loading files)."""
    keras = _keras()
    model.set_weights(weights)
    stack = list(model.layers)
    while stack:
        layer = stack.pop()
        if isinstance(layer, keras.Model):
            stack.extend(layer.layers)
        elif isinstance(layer, keras.layers.Normalization):
            layer.finalize_state()


def get_base(model: Any) -> Any:
    """The backbone sub-model of a classifier built by `build_model`."""
    keras = _keras()
    bases = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if len(bases) != 1:
        raise InputError(f"model '{model.name}' is not a skinlesion classifier (no backbone)")
    return bases[0]


def _is_batchnorm(layer: Any) -> bool:
    return isinstance(layer, _keras().layers.BatchNormalization)


def freeze_base(model: Any) -> None:
    get_base(model).trainable = False


def train_whole_base(model: Any) -> None:
    get_base(model).trainable = True


def block_prefixes(name: str, override: str = "") -> tuple[str, ...]:
    """Layer-name prefixes of the fine-tuned block: `override` (comma-separated) or default."""
    if override.strip():
        return tuple(p.strip() for p in override.split(",") if p.strip())
    return backbone(name).last_block


def unfreeze_block(model: Any, prefixes: Iterable[str]) -> list[str]:
    """Make only the base layers matching `prefixes` trainable (BatchNorm stays frozen).

    The head stays trainable. Returns the names of the base layers with trainable
    weights now; a prefix matching no layer is an InputError.
    """
    prefixes = tuple(prefixes)
    base = get_base(model)
    names = [layer.name for layer in base.layers]
    for prefix in prefixes:
        if not any(n.startswith(prefix) for n in names):
            raise InputError(
                f"fine-tune block '{prefix}' matches no layer of {base.name} "
                f"(last layers: {', '.join(names[-5:])})"
            )
    base.trainable = True
    unfrozen = []
    for layer in base.layers:
        in_block = layer.name.startswith(prefixes)
        layer.trainable = in_block and not _is_batchnorm(layer)
        if layer.trainable and layer.weights:
            unfrozen.append(layer.name)
    for name in HEAD_LAYERS:
        model.get_layer(name).trainable = True
    return unfrozen


# --- weights files in the store ------------------------------------------------------


def _split_uri(uri: str) -> tuple[Store, str]:
    parent, _, key = uri.rstrip("/").rpartition("/")
    if not key.endswith(".weights.h5") or "://" not in uri:
        raise InputError(f"weights URI must be a store URI of a .weights.h5 file, got {uri!r}")
    return open_store(parent), key


def load_base_weights(base: Any, uri: str) -> None:
    """Load a `.weights.h5` of the backbone alone from the store into `base`."""
    store, key = _split_uri(uri)
    if not store.exists(key):
        raise InputError(f"weights file not found: {uri}")
    with tempfile.TemporaryDirectory(prefix="skinlesion-weights-") as tmp:
        local = Path(tmp) / key
        store.get_file(key, local)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                base.load_weights(local)
        except (ValueError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            mine = base.name.lower()
            held = _weights_backbone(local, mine)
            if held is None:
                what = "weights of another model"
            elif held == mine:
                what = f"{held} weights with other layer shapes"
            else:
                what = f"{held} weights"
            raise InputError(
                f"weights file {uri} holds {what}, not {mine} weights (train.backbone): {first}"
            ) from None
    _fix_efficientnet_imagenet_normalization(base)
    logs.get().info("weights_loaded", uri=uri, backbone=base.name)


def _fix_efficientnet_imagenet_normalization(base: Any) -> None:
    import numpy as np

    if not base.name.startswith("efficientnet"):
        return
    norm = next(
        (layer for layer in base.layers if isinstance(layer, _keras().layers.Normalization)), None
    )
    if norm is None:
        return
    mean, variance, count = norm.get_weights()
    std = np.asarray(_IMAGENET_STDDEV_RGB, dtype=variance.dtype)
    if np.allclose(variance, std**2, rtol=1e-3):  # ImageNet file, built without the Rescaling
        norm.set_weights([mean, variance * std, count])
        norm.finalize_state()


def _weights_backbone(path: Path, other_than: str) -> str | None:
    """The backbone a weights file holds: as recorded by `save_base_weights`, else the first
    other known backbone it loads into (None: not HDF5, or no known backbone)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            recorded = f.attrs.get(BACKBONE_ATTR)
    except OSError:
        return None
    if recorded is not None:
        return str(recorded)
    for name in reversed(BACKBONES):  # the table lists the largest first: try small ones first
        if name == other_than:
            continue
        probe = build_base(name, _PROBE_SIZE)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                probe.load_weights(path)
        except (ValueError, OSError):
            continue
        return name
    return None


def save_base_weights(base: Any, uri: str) -> str:
    """Write the backbone's weights to a `.weights.h5` store URI, with the backbone's name
    (BACKBONE_ATTR); returns its SHA-256."""
    import h5py

    store, key = _split_uri(uri)
    with tempfile.TemporaryDirectory(prefix="skinlesion-weights-") as tmp:
        local = Path(tmp) / key
        base.save_weights(local)
        with h5py.File(local, "a") as f:
            f.attrs[BACKBONE_ATTR] = base.name.lower()
        return store.put_file(local, key)


def mirror_weights(name: str, uri: str, weights: str = "imagenet", image_size: int = 224) -> str:
    """Build a backbone (ImageNet weights by default: needs internet) and store its weights."""
    try:
        base = build_base(name, image_size, None if weights == "none" else weights)
    except Exception as exc:  # keras raises a bare Exception for a failed download
        raise SkinlesionError(f"cannot get {weights} weights for {name}: {exc}") from None
    return save_base_weights(base, uri)


def load_model(path: str | Path) -> Any:
    """A saved `.keras` classifier for inference (not compiled: no optimizer)."""
    try:
        return _keras().saving.load_model(path, compile=False)
    except Exception as exc:  # keras raises many types for a corrupt or foreign file
        raise InputError(f"{Path(path).name}: cannot load the Keras model: {exc}") from None


def model_image_size(net: Any) -> int:
    """The side of the square RGB input the model takes."""
    shape = tuple(net.input_shape)
    if len(shape) != 4 or shape[3] != 3 or shape[1] is None or shape[1] != shape[2]:
        raise InputError(f"the model takes input of shape {shape}, expected [batch, n, n, 3]")
    return int(shape[1])


def main(argv: list[str] | None = None) -> int:
    """`python -m skinlesion.model mirror BACKBONE URI`: ImageNet weights into the store."""
    parser = argparse.ArgumentParser(prog="python -m skinlesion.model")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("mirror", help="download a backbone's ImageNet weights into the store")
    p.add_argument("backbone", choices=sorted(BACKBONES))
    p.add_argument("uri", help="store URI ending in .weights.h5 (then: --weights URI)")
    args = parser.parse_args(argv)
    logs.configure(stage="mirror-weights")
    try:
        digest = mirror_weights(args.backbone, args.uri)
    except SkinlesionError as exc:
        logs.get().error("failed", error=str(exc), exit_code=exc.exit_code)
        return exc.exit_code
    logs.get().info("weights_mirrored", backbone=args.backbone, uri=args.uri, sha256=digest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
