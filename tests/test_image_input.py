"""Odd and bad image files under a .jpg name, through prepare's decoder: the odd ones
become RGB squares, the bad ones one DataError line naming the file."""

from __future__ import annotations

import io
import struct
import time
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from skinlesion import imaging
from skinlesion.errors import DataError

NAME = "HAM10000_images_part_1/ISIC_1.jpg"


def _encoded(img: Image.Image, fmt: str = "JPEG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _halves() -> Image.Image:
    """Red left half, blue right half (64x32)."""
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, :32] = (255, 0, 0)
    pixels[:, 32:] = (0, 0, 255)
    return Image.fromarray(pixels)


def _bomb_png(side: int = 20_000) -> bytes:
    """A PNG whose header claims side x side pixels (its data is one pixel's)."""
    data = bytearray(_encoded(Image.new("L", (1, 1)), "PNG"))
    ihdr = 8  # after the signature: length(4) type(4) then width, height
    data[ihdr + 8 : ihdr + 16] = struct.pack(">II", side, side)
    crc = zlib.crc32(bytes(data[ihdr + 4 : ihdr + 8 + 13]))
    data[ihdr + 8 + 13 : ihdr + 8 + 17] = struct.pack(">I", crc)
    return bytes(data)


def _rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 clockwise to view
    return _encoded(_halves(), exif=exif.tobytes(), quality=95)


ACCEPTED: dict[str, Callable[[], bytes]] = {
    "jpeg": lambda: _encoded(_halves()),
    "png under .jpg": lambda: _encoded(_halves(), "PNG"),
    "grayscale jpeg": lambda: _encoded(_halves().convert("L")),
    "cmyk jpeg": lambda: _encoded(_halves().convert("CMYK")),
}

REJECTED: dict[str, tuple[Callable[[], bytes], str]] = {
    "zero bytes": (lambda: b"", "cannot decode image"),
    "truncated jpeg": (lambda: _encoded(_halves())[:300], "cannot decode image"),
    "text": (lambda: b"not an image at all", "cannot decode image"),
    "20000x20000 bomb": (_bomb_png, "could be decompression bomb"),  # Pillow's own limit
    "10000x10000 image": (lambda: _bomb_png(10_000), "image of 10000x10000 pixels is over"),
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_odd_images_become_rgb_squares(case: str) -> None:
    img = imaging.decode_resized(ACCEPTED[case](), NAME, 16)
    assert img.mode == "RGB" and img.size == (16, 16)


@pytest.mark.parametrize("case", list(REJECTED))
def test_bad_images_are_one_line_naming_the_file(case: str) -> None:
    make, expected = REJECTED[case]
    data = make()
    start = time.monotonic()
    with pytest.raises(DataError) as info:
        imaging.resize_jpeg(data, NAME, 16)
    message = str(info.value)
    assert message.startswith(f"{NAME}: ") and expected in message and "\n" not in message
    assert time.monotonic() - start < 2  # refused from the header, not decoded


def test_exif_orientation_is_applied() -> None:
    plain = np.asarray(imaging.decode_resized(_encoded(_halves(), quality=95), NAME, 16), float)
    turned = np.asarray(imaging.decode_resized(_rotated(), NAME, 16), float)
    assert plain[8, 2, 0] > 200 and plain[8, 13, 2] > 200  # red left, blue right
    # Rotated 90 clockwise: the red (left) half is on top, the blue at the bottom.
    assert turned[2, 8, 0] > 200 and turned[13, 8, 2] > 200
