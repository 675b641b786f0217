"""The serving export: a TensorFlow SavedModel per registered version, under
`models/serving/<n>/` (layout.serving_key), the numeric version directory under a model base
path that TF Serving and KServe load.

Signature `serving_default`:
  input   `image_bytes`    string [N]: JPEG or PNG file bytes
  outputs `probabilities`  float32 [N, 7], columns in canonical class order (classes.py)
          `classes`        string [N, 7]: each column's class name
          `predicted`      string [N]: the most probable class

Decode, resize (the model's own `squash`/`crop` and size, from its lineage) and re-encode run
inside the graph (serving_graph.py, pixel for pixel as prepare); the backbone's preprocessing
is inside the Keras model already. So a client sends file bytes and gets what
`skinlesion predict` gives for the same file.

The export is written with the commit protocol: the owner mark, the variables, then
`saved_model.pb` (a TF Serving that polls the base path finds a version only once its graph
is there, after its variables), then `manifest.json` last.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from skinlesion import logs
from skinlesion.classes import CLASSES, NUM_CLASSES
from skinlesion.errors import InputError
from skinlesion.manifest import check_owned, claim, clear, publish
from skinlesion.results import Preprocessing
from skinlesion.storage import Store

SIGNATURE = "serving_default"
INPUT = "image_bytes"
OUTPUTS = ("probabilities", "classes", "predicted")
SAVED_MODEL_FILE = "saved_model.pb"
SERVING_STAGE = "serving"


def _signature_fn(net: Any, prep: Preprocessing) -> Any:
    """The serving function: encoded images [N] -> the OUTPUTS."""
    import tensorflow as tf

    from skinlesion.serving_graph import preprocess

    size, mode, quality = prep.image_size, prep.resize, prep.jpeg_quality
    names = tf.constant(CLASSES)

    def serve(image_bytes: Any) -> dict[str, Any]:
        pixels = tf.map_fn(
            lambda data: preprocess(data, size, mode, quality),
            image_bytes,
            fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8),
        )
        proba = tf.cast(net(tf.cast(pixels, tf.float32), training=False), tf.float32)
        n = tf.shape(image_bytes)[0]
        return {
            "probabilities": proba,
            "classes": tf.broadcast_to(names, [n, NUM_CLASSES]),
            "predicted": tf.gather(names, tf.argmax(proba, axis=1)),
        }

    return serve


def build(model_file: Path, prep: Preprocessing, out: Path) -> dict[str, Any]:
    """Write the SavedModel of the Keras model at `model_file` into the directory `out`;
    returns what its manifest records about it."""
    import keras
    import tensorflow as tf

    from skinlesion.model import load_model, model_image_size

    if prep.resize not in ("squash", "crop"):
        raise InputError(f"unknown resize mode {prep.resize!r} in the model's lineage")
    net = load_model(model_file)
    size = model_image_size(net)
    if size != prep.image_size:
        raise InputError(
            f"the model takes {size}x{size} images but its lineage prepared "
            f"{prep.image_size}x{prep.image_size}"
        )
    archive = keras.export.ExportArchive()
    archive.track(net)
    archive.add_endpoint(
        SIGNATURE,
        _signature_fn(net, prep),
        input_signature=[tf.TensorSpec([None], tf.string, name=INPUT)],
    )
    archive.write_out(str(out), verbose=False)
    logs.get().info("saved_model_built", out=str(out), image_size=size, resize=prep.resize)
    return {
        "signature": SIGNATURE,
        "inputs": {INPUT: "string [N]: JPEG or PNG file bytes"},
        "outputs": {
            "probabilities": f"float32 [N, {NUM_CLASSES}]",
            "classes": f"string [N, {NUM_CLASSES}]",
            "predicted": "string [N]",
        },
        "classes": list(CLASSES),
        "preprocessing": {
            "image_size": prep.image_size,
            "resize": prep.resize,
            "jpeg_quality": prep.jpeg_quality,
        },
        "tensorflow_version": tf.__version__,
    }


def publish_export(out: Store, work: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Upload the SavedModel in `work` to the prefix `out` (a version's serving prefix) by
    the commit protocol; the variables before the graph, the manifest last."""
    check_owned(SERVING_STAGE, out)
    claim(SERVING_STAGE, out)
    clear(out, keep_state=False)
    manifest = {
        "stage": SERVING_STAGE,
        "fingerprint": fields["model_sha256"],  # the export is its model's
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **fields,
    }
    return publish(out, work, manifest, SERVING_STAGE, last=(SAVED_MODEL_FILE,))
