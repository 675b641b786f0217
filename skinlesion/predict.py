"""`skinlesion predict`: class probabilities for image files.

The model is a stage or champion prefix holding `model.keras` (for example
`…/models/latest` or `…/runs/<id>/finetune`), or the URI of a `.keras` file, in
any store. Each image goes through the same code as prepare
(`imaging.resize_jpeg`: decode, resize to the model's input side with the
lineage's `squash`/`crop` mode, re-encode as JPEG) and is then decoded like the
training shards, so the model sees what it was trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from skinlesion import logs
from skinlesion.classes import CLASSES, NUM_CLASSES
from skinlesion.errors import DataError, InputError
from skinlesion.imaging import Resize, resize_jpeg
from skinlesion.layout import MODEL_FILE
from skinlesion.lineage import DEFAULT_JPEG_QUALITY, DEFAULT_RESIZE, model_preprocessing
from skinlesion.model import load_model, model_image_size
from skinlesion.results import Preprocessing
from skinlesion.scratch import scratch_dir
from skinlesion.storage import Store, open_store

BATCH = 32


def resolve_model(model_uri: str) -> tuple[Store, str]:
    """(store prefix, key of the .keras file) for a prefix or a `.keras` file URI."""
    uri = model_uri.rstrip("/")
    if not uri.endswith(".keras"):
        return open_store(uri), MODEL_FILE
    if "://" not in uri:  # a plain local path
        path = Path(uri).resolve()
        return open_store(str(path.parent)), path.name
    head, _, name = uri.rpartition("/")
    if head.endswith("/") or head.endswith(":"):
        raise InputError(f"model URI {model_uri!r} has no parent prefix")
    return open_store(head), name


def load_images(images: list[str], size: int, resize: Resize, quality: int) -> np.ndarray:
    """[n, size, size, 3] float32 0-255, each image prepared like the training shards."""
    import tensorflow as tf

    out = np.empty((len(images), size, size, 3), dtype=np.float32)
    for i, name in enumerate(images):
        path = Path(name)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DataError(f"{name}: cannot read image: {exc.strerror or exc}") from None
        jpeg = resize_jpeg(data, name, size, resize, quality)
        out[i] = tf.io.decode_jpeg(jpeg, channels=3).numpy().astype(np.float32)
    return out


def predict(model_uri: str, images: list[str]) -> list[dict[str, Any]]:
    """Per image: {"image": path, "predicted": class, "probabilities": {class: p}}."""
    log = logs.get()
    if not images:
        raise InputError("no images given")
    store, key = resolve_model(model_uri)
    if not store.exists(key):
        raise InputError(f"no model at {store.uri}/{key}")
    prep = model_preprocessing(store)
    with scratch_dir("skinlesion-predict-") as tmp:
        local = Path(tmp) / MODEL_FILE
        store.get_file(key, local)
        net = load_model(local)
    size = model_image_size(net)
    if prep is None:
        log.warning(
            "preprocessing_unknown",
            message=f"no manifest records how the training images were resized; "
            f"using '{DEFAULT_RESIZE}'",
            model=store.uri,
        )
        prep = Preprocessing(size, DEFAULT_RESIZE, DEFAULT_JPEG_QUALITY)
    if prep.resize not in ("squash", "crop"):
        raise InputError(f"{store.uri}: unknown resize mode {prep.resize!r} in its lineage")
    resize: Resize = "crop" if prep.resize == "crop" else "squash"
    quality = prep.jpeg_quality
    batches = []
    for start in range(0, len(images), BATCH):  # bounded memory for long image lists
        pixels = load_images(images[start : start + BATCH], size, resize, quality)
        batches.append(np.asarray(net.predict_on_batch(pixels), dtype=np.float64))
    proba = np.concatenate(batches)
    if proba.shape != (len(images), NUM_CLASSES):
        raise InputError(f"the model outputs shape {proba.shape[1:]}, expected ({NUM_CLASSES},)")
    results = [
        {
            "image": name,
            "predicted": CLASSES[int(row.argmax())],
            "probabilities": {c: float(p) for c, p in zip(CLASSES, row, strict=True)},
        }
        for name, row in zip(images, proba, strict=True)
    ]
    log.info("predict_done", images=len(images), model=store.uri, image_size=size, resize=resize)
    return results
