"""TensorBoard event files written where the `tensorboard` package is absent (the image,
`make run`: TensorFlow does not depend on it), read back with TensorBoard's own reader."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.util import tensor_util

from skinlesion.layout import TENSORBOARD_DIR
from skinlesion.obs.tensorboard_log import _png_size

REPO = Path(__file__).resolve().parents[1]

WRITE = """
import sys
sys.modules["tensorboard"] = None  # as where it is not installed: importing it fails
from pathlib import Path
from skinlesion.obs.tensorboard_log import EventLog
from skinlesion.storage import open_store
work, out, png = Path(sys.argv[1]), open_store(sys.argv[2]), Path(sys.argv[3]).read_bytes()
log = EventLog(work, out)
for step in (1, 2):
    log.scalars(step, {"loss/train": 1.0 / step, "accuracy/val": None})
log.image_png("confusion_matrix/val", png, 2)
log.upload()
log.close()
"""


def png_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def test_png_size_reads_the_header() -> None:
    assert _png_size(png_bytes(31, 17)) == (31, 17)
    with pytest.raises(ValueError, match="not a PNG"):
        _png_size(b"GIF89a" + bytes(30))


@pytest.mark.slow
def test_events_are_written_without_tensorboard_and_read_by_it(tmp_path: Path) -> None:
    png = tmp_path / "figure.png"
    png.write_bytes(png_bytes(40, 30))
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-c", WRITE, str(tmp_path / "work"), out.as_uri(), str(png)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    acc = ea.EventAccumulator(str(out / TENSORBOARD_DIR), size_guidance={ea.TENSORS: 0})
    acc.Reload()
    loss = {
        e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors("loss/train")
    }
    assert loss == {1: 1.0, 2: 0.5}
    assert acc.SummaryMetadata("loss/train").plugin_data.plugin_name == "scalars"
    assert "accuracy/val" not in acc.Tags()["tensors"]  # None: not written
    (image,) = acc.Tensors("confusion_matrix/val")
    assert acc.SummaryMetadata("confusion_matrix/val").plugin_data.plugin_name == "images"
    width, height, data = tensor_util.make_ndarray(image.tensor_proto)
    assert (width, height, data, image.step) == (b"40", b"30", png.read_bytes(), 2)
