"""TensorBoard event files of a training stage, written with `tf.summary` into the stage's
work directory under `TENSORBOARD_DIR` (committed with the stage) and uploaded to the same
key of the stage prefix after every epoch, so that TensorBoard shows a running training.

A new attempt of a stage starts from a cleared prefix (only the resume state survives), so
each attempt writes one event file from scratch, replaying the epochs of its resume state
first: every epoch appears once, whatever the number of resumes.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from skinlesion.layout import TENSORBOARD_DIR
from skinlesion.storage import Store


class EventLog:
    """One event file per attempt under `work/tensorboard/`, mirrored to `out`."""

    def __init__(self, work: Path, out: Store) -> None:
        import tensorflow as tf

        self.local = work / TENSORBOARD_DIR
        self.local.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.writer = tf.summary.create_file_writer(str(self.local))

    def scalars(self, step: int, values: Mapping[str, float | None]) -> None:
        import tensorflow as tf

        with self.writer.as_default(step=step):
            for tag, value in values.items():
                if value is not None:
                    tf.summary.scalar(tag, float(value))

    def image_png(self, tag: str, png: bytes, step: int) -> None:
        import tensorflow as tf

        with self.writer.as_default(step=step):
            tf.summary.image(tag, tf.image.decode_png(png, channels=3)[None], max_outputs=1)

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
