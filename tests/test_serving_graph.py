"""The serving graph's preprocessing gives, pixel for pixel, what prepare (Pillow) made and
training decoded, on a table of images: sizes and aspect ratios on both sides of Pillow's
pass-order rule, down- and upscaling, both resize modes, PNG modes, grayscale, progressive
JPEG, every EXIF orientation (little- and big-endian, JPEG and PNG) and XMP; bad input is
refused from the header, before any decode."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image

from skinlesion.imaging import resize_jpeg

pytestmark = pytest.mark.slow  # TensorFlow

XMP = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/'
    b'22-rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
    b'tiff:Orientation="8"/></rdf:RDF></x:xmpmeta>'
)


def lesion(width: int, height: int, seed: int = 0) -> np.ndarray:
    """An off-centre dark blob on skin tones with noise (orientation and crop show)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    blob = ((xx - width / 3) ** 2 + (yy - height / 2) ** 2) < (min(width, height) / 4) ** 2
    pixels = np.where(blob[..., None], [90, 50, 40], [210, 170, 150]).astype(float)
    pixels += rng.normal(0, 12, pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def encoded(pixels: np.ndarray, fmt: str = "JPEG", mode: str = "RGB", **save: Any) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, fmt, **save)
    return buf.getvalue()


def oriented(code: int, fmt: str = "JPEG", endian: str = "<") -> bytes:
    exif = Image.Exif()
    exif[0x0112] = code
    exif.endian = endian
    return encoded(lesion(600, 450, code), fmt, exif=exif.tobytes())


CASES: dict[str, bytes] = {
    "600x450 JPEG (HAM10000)": encoded(lesion(600, 450), quality=90),
    "450x600 portrait (vertical pass first)": encoded(lesion(450, 600, 1)),
    "125x126 nearly square": encoded(lesion(125, 126, 2)),
    "1000x777 (DCT scale 1/8 at 96 px)": encoded(lesion(1000, 777, 3)),
    "97x80 upscaled": encoded(lesion(97, 80, 4)),
    "progressive JPEG": encoded(lesion(600, 450, 5), progressive=True),
    "grayscale JPEG": encoded(lesion(600, 450, 6), mode="L"),
    "PNG RGB": encoded(lesion(300, 200, 7), "PNG"),
    "PNG RGBA": encoded(lesion(300, 200, 8), "PNG", "RGBA"),
    "PNG palette": encoded(lesion(300, 200, 9), "PNG", "P"),
    "PNG grayscale": encoded(lesion(300, 200, 10), "PNG", "L"),
    **{f"EXIF orientation {k}": oriented(k) for k in range(2, 9)},
    "EXIF orientation 6, big-endian": oriented(6, endian=">"),
    "EXIF orientation 5 in a PNG": oriented(5, "PNG"),
    "XMP orientation 8": encoded(lesion(600, 450, 11), xmp=XMP),
}


def graph(size: int, mode: str) -> Callable[[bytes], np.ndarray]:
    import tensorflow as tf

    from skinlesion.serving_graph import preprocess

    fn = tf.function(
        lambda data: preprocess(data, size, mode, 95),
        input_signature=[tf.TensorSpec([], tf.string)],
    )
    return lambda data: fn(tf.constant(data)).numpy()


def prepared(data: bytes, size: int, mode: str) -> np.ndarray:
    """prepare's JPEG of the image, decoded as the training shards are."""
    import tensorflow as tf

    return tf.io.decode_jpeg(resize_jpeg(data, "case", size, mode, 95), channels=3).numpy()  # type: ignore[arg-type]


@pytest.mark.parametrize(("size", "mode"), [(96, "squash"), (224, "crop"), (33, "crop")])
def test_the_graph_makes_the_pixels_prepare_made(size: int, mode: str) -> None:
    run = graph(size, mode)
    for name, data in CASES.items():
        got, expected = run(data), prepared(data, size, mode)
        assert got.shape == expected.shape == (size, size, 3), name
        differ = int((got != expected).sum())
        assert differ == 0, f"{name}: {differ} pixel values differ from prepare's"


def test_orientation_changes_the_pixels() -> None:
    """The EXIF cases above are not vacuous: orientation 6 is not the stored image."""
    run = graph(96, "crop")
    plain = encoded(lesion(600, 450, 6))
    assert not np.array_equal(run(plain), run(oriented(6)))


def _header_jpeg(width: int, height: int) -> bytes:
    """A small JPEG whose frame header claims width x height."""
    data = bytearray(encoded(lesion(16, 16)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def test_bad_input_is_refused_before_decoding() -> None:
    import tensorflow as tf

    run = graph(96, "squash")
    png = bytearray(encoded(lesion(16, 16), "PNG"))
    png[16:24] = (20000).to_bytes(4, "big") * 2  # IHDR: 20000 x 20000
    cases = {
        b"GIF89a" + bytes(64): "not a JPEG or PNG",
        b"": "not a JPEG or PNG",
        bytes(png): "20000x20000 pixels is over the limit of 50,000,000",
        _header_jpeg(10000, 6000): "10000x6000 pixels is over the limit",
        encoded(lesion(600, 450))[:3000]: "Invalid JPEG data",  # truncated: libjpeg says so
    }
    for data, message in cases.items():
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            run(data)
