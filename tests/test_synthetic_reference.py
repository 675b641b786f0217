"""The synthetic generator against a reference recorded before it became a subpackage:
same plan, same metadata file, same images for the same seed (image thumbnails compared
within a few grey levels, so float rounding in numpy or the JPEG codec cannot fail it; a
changed random draw or drawing step moves them by far more).

The fine texture that gives the files real-like sizes (about 250 KB, as HAM10000's) was
added later from its own random stream: zero-mean, it leaves the thumbnails as recorded,
so its reference is the files' sizes, recorded when it was added (within 3%: another
libjpeg build may code a few bytes differently; a lost or changed texture moves them by
far more)."""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image

from skinlesion import synthetic

SEED, IMAGES = 11, 70
METADATA_SHA256 = "a9ca4121a2bdd5f2e9095615edbe2d3612e64408352f85496c7a064b33e203a5"
# 4x4 box-filtered grey thumbnails of the first four images (by key) of the reference tree.
THUMBNAILS = {
    "HAM10000_images_part_1/ISIC_0024310.jpg": [
        180, 183, 180, 166, 156, 159, 150, 172, 169, 109, 101, 164, 182, 170, 177, 168,
    ],
    "HAM10000_images_part_1/ISIC_0024337.jpg": [
        38, 159, 160, 37, 100, 174, 165, 96, 96, 148, 149, 97, 37, 154, 153, 38,
    ],
    "HAM10000_images_part_1/ISIC_0024370.jpg": [
        147, 162, 151, 151, 158, 152, 97, 156, 152, 164, 157, 158, 146, 163, 161, 155,
    ],
    "HAM10000_images_part_1/ISIC_0024690.jpg": [
        151, 161, 119, 147, 158, 150, 78, 158, 157, 176, 165, 165, 143, 170, 177, 152,
    ],
}  # fmt: skip
JPEG_BYTES = {
    "HAM10000_images_part_1/ISIC_0024310.jpg": 257891,
    "HAM10000_images_part_1/ISIC_0024337.jpg": 231619,
    "HAM10000_images_part_1/ISIC_0024370.jpg": 257752,
    "HAM10000_images_part_1/ISIC_0024690.jpg": 264185,
}


def test_metadata_matches_the_reference() -> None:
    data = synthetic.metadata_csv(synthetic.plan(IMAGES, SEED))
    assert hashlib.sha256(data).hexdigest() == METADATA_SHA256


def test_images_match_the_reference() -> None:
    specs = sorted(synthetic.plan(IMAGES, SEED), key=lambda s: s.key)[: len(THUMBNAILS)]
    assert [s.key for s in specs] == list(THUMBNAILS)
    for spec in specs:
        data = synthetic.render(spec)
        assert abs(len(data) / JPEG_BYTES[spec.key] - 1) < 0.03, (spec.key, len(data))
        img = Image.open(io.BytesIO(data)).convert("L")
        thumb = np.asarray(img.resize((4, 4), Image.Resampling.BOX), dtype=int).flatten()
        assert np.abs(thumb - THUMBNAILS[spec.key]).max() <= 3, (spec.key, thumb.tolist())
