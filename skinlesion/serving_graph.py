"""Prepare's image preprocessing as TensorFlow graph ops, for the serving SavedModel.

A client of the exported model sends file bytes; the graph must turn them into exactly the
pixels the model was trained on, which prepare made with Pillow (`imaging.decode_resized`,
`imaging.resize_jpeg`) and training decoded with `tf.io.decode_jpeg`. A look-alike
(`tf.image.decode_image` + `tf.image.resize(antialias=True)`) differs from prepare by up to 56
levels (mean 1.3) on tests/test_serving_graph.py's images; instead each step is Pillow's:

- JPEG: decoded at the DCT scale Pillow's `draft` picks (the largest of 1/8, 1/4, 1/2, 1
  that keeps both sides >= the target), with libjpeg's accurate integer IDCT as Pillow;
  PNG: decoded whole (Pillow has no draft for it). Other formats are refused.
- EXIF orientation (the APP1 `Exif` segment of a JPEG, the `eXIf` chunk of a PNG, else an
  XMP `tiff:Orientation`) applied as `ImageOps.exif_transpose` does, when it lies in the
  first HEAD bytes.
- Pillow's antialiased bilinear resize (Resample.c, 8-bit path): its coefficients in float64
  in the same order of operations, rounded to its 22-bit fixed point, both passes rounded
  to uint8, in the pass order its cost rule picks; `crop` takes the same centre square.
- Re-encoded as JPEG at the prepare quality (libjpeg, 4:2:0, as Pillow saves) and decoded
  as the training shards are.

tests/test_serving_graph.py checks the output pixel for pixel against `imaging` on a table
of images (sizes, both resize modes, PNG, grayscale, progressive, every EXIF orientation).
Known gaps, refused or different: CMYK JPEGs (libjpeg's and Pillow's CMYK->RGB differ),
16-bit grayscale PNGs, orientation metadata after the first HEAD bytes.
"""

from __future__ import annotations

from typing import Any

from skinlesion.imaging import MAX_PIXELS

HEAD = 65536  # bytes searched for orientation metadata
PAD = 64  # zero bytes after them, longer than any pattern searched for
PRECISION_BITS = 22  # Pillow's fixed point for 8-bit resampling: 32 - 8 - 2
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ORIENTATION_TAG = 0x0112
MAX_IFD_ENTRIES = 64  # IFD0 entries looked at for the orientation tag


def _tf() -> Any:
    import tensorflow as tf

    return tf


# --- bytes ----------------------------------------------------------------------------------


def _head(data: Any) -> Any:
    """The first HEAD bytes as int64 [HEAD + PAD], zero padded (room for the patterns)."""
    tf = _tf()
    raw = tf.cast(tf.io.decode_raw(tf.strings.substr(data, 0, HEAD), tf.uint8), tf.int64)
    return tf.pad(raw, [[0, HEAD + PAD - tf.size(raw)]])


def _find(b: Any, pattern: dict[int, int]) -> Any:
    """The first index i with b[i + k] == v for each (k, v) of `pattern`, else -1."""
    tf = _tf()
    hit = tf.ones([HEAD], tf.bool)
    for k, v in pattern.items():
        hit &= tf.equal(b[k : k + HEAD], v)
    none = tf.constant(HEAD, tf.int64)
    first = tf.reduce_min(tf.where(hit, tf.range(HEAD, dtype=tf.int64), none))
    return tf.where(first < HEAD, first, -tf.ones_like(first))


def _at(b: Any, offsets: Any) -> Any:
    """b[offsets] with out-of-range offsets read as 0."""
    tf = _tf()
    return tf.gather(b, tf.clip_by_value(offsets, 0, HEAD + PAD - 1))


def _uint(b: Any, offset: Any, size: int, little: Any) -> Any:
    """The unsigned int of `size` bytes at `offset` (any shape), little- or big-endian."""
    tf = _tf()
    big, small = tf.zeros_like(offset), tf.zeros_like(offset)
    for i in range(size):
        byte = _at(b, offset + i)
        big, small = big * 256 + byte, small + byte * 256**i
    return tf.where(little, small, big)


def _pattern(text: bytes, at: int = 0) -> dict[int, int]:
    return {at + i: c for i, c in enumerate(text)}


def _tiff_orientation(b: Any, tiff: Any) -> tuple[Any, Any]:
    """(found, value) of the orientation tag in IFD0 of the TIFF block at `tiff` (-1: none)."""
    tf = _tf()
    little = tf.equal(_at(b, tiff), ord("I"))
    valid = (tiff >= 0) & (little | tf.equal(_at(b, tiff), ord("M")))
    ifd = tiff + _uint(b, tiff + 4, 4, little)
    count = _uint(b, ifd, 2, little)
    entry = ifd + 2 + 12 * tf.range(MAX_IFD_ENTRIES, dtype=tf.int64)
    in_head = (entry + 12 <= HEAD) & (tf.range(MAX_IFD_ENTRIES, dtype=tf.int64) < count)
    tag = _uint(b, entry, 2, little)
    kind = _uint(b, entry + 2, 2, little)
    value = tf.where(
        tf.equal(kind, 3), _uint(b, entry + 8, 2, little), _uint(b, entry + 8, 4, little)
    )
    match = valid & in_head & tf.equal(tag, ORIENTATION_TAG) & ((kind == 3) | (kind == 4))
    first = tf.argmax(tf.cast(match, tf.int32))
    found = tf.reduce_any(match)
    return found, tf.where(found, value[first], tf.zeros_like(value[first]))


def orientation(b: Any, is_png: Any) -> Any:
    """The EXIF orientation (1-8) Pillow would apply, from a file's `_head`; 1 (none) when
    absent or invalid."""
    tf = _tf()
    app1 = _find(b, {0: 0xFF, 1: 0xE1, **_pattern(b"Exif\0\0", 4)})
    exif = _find(b, _pattern(b"eXIf"))
    none = -tf.ones_like(exif)
    tiff = tf.where(
        is_png, tf.where(exif >= 0, exif + 4, none), tf.where(app1 >= 0, app1 + 10, none)
    )
    found, value = _tiff_orientation(b, tiff)
    xmp = [_find(b, _pattern(b"tiff:Orientation" + end)) for end in (b'="', b">")]
    hits = tf.stack(xmp)
    first = tf.reduce_min(
        tf.where(hits >= 0, hits, tf.fill(tf.shape(hits), tf.constant(HEAD, tf.int64)))
    )
    skip = tf.where(tf.equal(first, xmp[0]), tf.constant(18, tf.int64), tf.constant(17, tf.int64))
    digit = _at(b, first + skip) - ord("0")
    one = tf.ones_like(digit)
    from_xmp = tf.where((first < HEAD) & (digit >= 0) & (digit <= 9), digit, one)
    chosen = tf.where(found, value, from_xmp)
    return tf.where((chosen >= 1) & (chosen <= 8), chosen, one)


# --- decode ---------------------------------------------------------------------------------


def _png_size(b: Any) -> tuple[Any, Any]:
    """(height, width) from a PNG's IHDR chunk (big-endian, bytes 16-23)."""
    tf = _tf()
    big = tf.constant(False)
    return _uint(b, tf.constant(20, tf.int64), 4, big), _uint(b, tf.constant(16, tf.int64), 4, big)


def _draft_ratio(height: Any, width: Any, size: int) -> Any:
    """Index into (1, 2, 4, 8) of Pillow's JPEG draft scale for a `size` target."""
    tf = _tf()
    scale = tf.minimum(width // size, height // size)
    return tf.where(scale >= 8, 3, tf.where(scale >= 4, 2, tf.where(scale >= 2, 1, 0)))


def _transpose(img: Any, code: Any) -> Any:
    """`ImageOps.exif_transpose` for orientation `code` (Pillow's Transpose methods)."""
    tf = _tf()

    def t(x: Any) -> Any:
        return tf.transpose(x, [1, 0, 2])

    branches = [
        lambda: img,  # 0 unused
        lambda: img,  # 1 as stored
        lambda: tf.reverse(img, [1]),  # 2 FLIP_LEFT_RIGHT
        lambda: tf.reverse(img, [0, 1]),  # 3 ROTATE_180
        lambda: tf.reverse(img, [0]),  # 4 FLIP_TOP_BOTTOM
        lambda: t(img),  # 5 TRANSPOSE
        lambda: tf.image.rot90(img, 3),  # 6 ROTATE_270 (counter-clockwise)
        lambda: tf.reverse(t(img), [0, 1]),  # 7 TRANSVERSE
        lambda: tf.image.rot90(img, 1),  # 8 ROTATE_90
    ]
    return tf.switch_case(tf.cast(code, tf.int32), branches)


def _refuse(message: Any) -> Any:
    """A branch that fails with `message` (InvalidArgumentError) before anything decodes."""
    tf = _tf()
    with tf.control_dependencies([tf.debugging.Assert(False, [message])]):
        return tf.zeros([1, 1, 3], tf.uint8)


def decode(data: Any, size: int) -> Any:
    """uint8 [h, w, 3] as Pillow hands it to the resize: drafted, RGB, EXIF-oriented.
    InvalidArgumentError naming the problem for anything but a sane JPEG or PNG; nothing
    is decoded before the format and the pixel count (from the header) are checked."""
    tf = _tf()
    is_jpeg = tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff")
    is_png = tf.equal(tf.strings.substr(data, 0, 8), PNG_SIGNATURE)
    b = _head(data)

    def jpeg_size() -> Any:
        shape = tf.cast(tf.io.extract_jpeg_shape(data), tf.int64)
        return shape[0], shape[1]

    def png_size() -> Any:
        return _png_size(b)

    def no_size() -> Any:
        zero = tf.constant(0, tf.int64)
        return zero, zero

    height, width = tf.cond(is_jpeg, jpeg_size, lambda: tf.cond(is_png, png_size, no_size))
    pixels = height * width
    ok = (is_jpeg | is_png) & (pixels > 0) & (pixels <= MAX_PIXELS)
    message = tf.where(
        is_jpeg | is_png,
        tf.strings.format(
            f"the image of {{}}x{{}} pixels is over the limit of {MAX_PIXELS:,} (not decoded)",
            (width, height),
        ),
        "the image is not a JPEG or PNG file",
    )

    def scaled(r: int) -> Any:
        return lambda: tf.io.decode_jpeg(data, channels=3, ratio=r, dct_method="INTEGER_ACCURATE")

    def pixels_of() -> Any:
        ratio = _draft_ratio(height, width, size)
        return tf.cond(
            is_jpeg,
            lambda: tf.switch_case(tf.cast(ratio, tf.int32), [scaled(r) for r in (1, 2, 4, 8)]),
            lambda: tf.io.decode_png(data, channels=3),
        )

    img = tf.cond(ok, pixels_of, lambda: _refuse(message))
    return _transpose(img, orientation(b, is_png))


# --- resize ---------------------------------------------------------------------------------


def _coefficients(in_size: Any, in0: Any, in1: Any, out_size: int) -> Any:
    """Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the bilinear filter: a
    dense float64 [out, in] matrix of its integer weights (scaled by 2**PRECISION_BITS)."""
    tf = _tf()
    f64 = tf.float64
    in0, in1 = tf.cast(in0, f64), tf.cast(in1, f64)
    scale = (in1 - in0) / float(out_size)
    filterscale = tf.maximum(scale, 1.0)
    support = 1.0 * filterscale  # the bilinear filter's support is 1
    ksize = tf.cast(tf.math.ceil(support), tf.int32) * 2 + 1
    center = in0 + (tf.cast(tf.range(out_size), f64) + 0.5) * scale
    inv_filterscale = 1.0 / filterscale
    xmin = tf.maximum(tf.cast(center - support + 0.5, tf.int32), 0)  # C's (int): truncation
    xmax = tf.minimum(tf.cast(center + support + 0.5, tf.int32), tf.cast(in_size, tf.int32))
    xmax -= xmin

    def weight(j: Any) -> Any:
        t = tf.abs((tf.cast(j, f64) - center[:, None] + 0.5) * inv_filterscale)
        return tf.where(t < 1.0, 1.0 - t, 0.0)

    window = tf.range(ksize)[None, :]
    taps = tf.where(window < xmax[:, None], weight(xmin[:, None] + window), 0.0)
    # The normaliser summed tap by tap, in Pillow's order (float sums depend on it).
    total = tf.foldl(lambda acc, tap: acc + tap, tf.transpose(taps), tf.zeros_like(center))
    j = tf.range(tf.cast(in_size, tf.int32))[None, :]
    inside = (j >= xmin[:, None]) & (j < (xmin + xmax)[:, None])
    k = tf.where(inside, weight(tf.broadcast_to(j, [out_size, tf.size(j)])), 0.0)
    k = tf.where(total[:, None] != 0.0, k / total[:, None], k)
    return tf.floor(0.5 + k * float(1 << PRECISION_BITS))


def _pass(img: Any, weights: Any, axis: int) -> Any:
    """One resampling pass along `axis` (1: horizontal, 0: vertical), rounded to uint8 as
    Pillow's clip8: exact, every product and sum is an integer below 2**53."""
    tf = _tf()
    pixels = tf.cast(img, tf.float64)
    spec = "hwc,xw->hxc" if axis == 1 else "hwc,yh->ywc"
    total = tf.einsum(spec, pixels, weights) + float(1 << (PRECISION_BITS - 1))
    value = tf.floor(total / float(1 << PRECISION_BITS))
    return tf.cast(tf.clip_by_value(value, 0.0, 255.0), tf.uint8)


def resize(img: Any, size: int, mode: str) -> Any:
    """`Image.resize((size, size), BILINEAR, box)` as `imaging.decode_resized` calls it."""
    tf = _tf()
    height, width = tf.shape(img)[0], tf.shape(img)[1]
    if mode == "crop":  # imaging.centre_square
        side = tf.minimum(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        box = (left, top, left + side, top + side)
    else:
        box = (0, 0, width, height)
    horizontal = _coefficients(width, box[0], box[2], size)
    vertical = _coefficients(height, box[1], box[3], size)
    # Pillow 13's rule: the vertical pass first when the height shrinks more than twice
    # as much as the width.
    vertical_first = (height - size > 0) & (height - size > (width - size) * 2)
    return tf.cond(
        vertical_first,
        lambda: _pass(_pass(img, vertical, 0), horizontal, 1),
        lambda: _pass(_pass(img, horizontal, 1), vertical, 0),
    )


def preprocess(data: Any, size: int, mode: str, quality: int) -> Any:
    """uint8 [size, size, 3]: the pixels training saw for an image file's bytes."""
    tf = _tf()
    resized = resize(decode(data, size), size, mode)
    jpeg = tf.io.encode_jpeg(resized, quality=quality)  # prepare's shard JPEG
    pixels = tf.io.decode_jpeg(jpeg, channels=3)  # as shards.py decodes it for training
    return tf.ensure_shape(pixels, [size, size, 3])
