"""TensorBoard event files of a training stage, written with `tf.summary` into the stage's
work directory under `TENSORBOARD_DIR` (committed with the stage) and uploaded to the same
key of the stage prefix after every epoch, so that TensorBoard shows a running training.

A new attempt of a stage starts from a cleared prefix (only the resume state survives), so
each attempt writes one event file from scratch, replaying the epochs of its resume state
first: every epoch appears once, whatever the number of resumes.

The summaries are written with TensorFlow's own `tf.summary.write` and the plugin metadata
TensorBoard's `scalar` and `image` would attach, so the files read the same in TensorBoard,
but the `tensorboard` package is not needed where they are written: TensorFlow does not
depend on it, and without it `tf.summary.scalar` raises (the image and `make run` have none).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from skinlesion.layout import TENSORBOARD_DIR
from skinlesion.storage import Store


def _metadata(plugin: str) -> Any:
    """SummaryMetadata of a TensorBoard plugin (its plugin data: version 0, empty content)."""
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = plugin
    return metadata


def _png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


class EventLog:
    """One event file per attempt under `work/tensorboard/`, mirrored to `out`."""

    def __init__(self, work: Path, out: Store) -> None:
        import tensorflow as tf

        self.local = work / TENSORBOARD_DIR
        self.local.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.writer = tf.summary.create_file_writer(str(self.local))

    def scalars(self, step: int, values: Mapping[str, float | None]) -> None:
        """What `tf.summary.scalar` writes: a float32 scalar, plugin `scalars`."""
        import tensorflow as tf

        metadata = _metadata("scalars")
        with self.writer.as_default(step=step):
            for tag, value in values.items():
                if value is not None:
                    tf.summary.write(tag, tf.constant(float(value), tf.float32), metadata=metadata)

    def image_png(self, tag: str, png: bytes, step: int) -> None:
        """What `tf.summary.image` writes for one PNG: [width, height, png], plugin `images`."""
        import tensorflow as tf

        width, height = _png_size(png)
        tensor = tf.constant([str(width).encode(), str(height).encode(), png])
        with self.writer.as_default(step=step):
            tf.summary.write(tag, tensor, metadata=_metadata("images"))

    def upload(self) -> None:
        """Flush and copy the event files to `<out>/tensorboard/` (same names)."""
        self.writer.flush()
        for path in sorted(self.local.iterdir()):
            self.out.put_file(path, f"{TENSORBOARD_DIR}/{path.name}")

    def close(self) -> None:
        self.writer.close()


def figure_png(draw: Callable[..., Any], *args: Any) -> bytes:
    """The PNG bytes of a plot function `draw(*args, path)` that saves to a file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "figure.png"
        draw(*args, path)
        return path.read_bytes()
