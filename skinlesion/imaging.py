"""Decode, resize and re-encode one JPEG (the per-image work of prepare), and the
process pool that runs per-image work in parallel with bounded memory.

`draft()` asks libjpeg to decode at the smallest DCT scale (1/2, 1/4, 1/8) that
still covers the target size, which skips most of the decoding work for a
600x450 -> 224x224 resize; the rest is an antialiased PIL resize.
"""

from __future__ import annotations

import hashlib
import io
import math
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from PIL import Image, ImageOps, ImageStat, UnidentifiedImageError

from skinlesion import userinput
from skinlesion.errors import DataError
from skinlesion.storage import Store, open_store

Resize = Literal["squash", "crop"]
T = TypeVar("T")
R = TypeVar("R")
MAX_PIXELS = 50_000_000  # refused from the header, before decoding (HAM10000: 270,000)
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    UnidentifiedImageError,
    Image.DecompressionBombError,
)


def centre_square(width: int, height: int) -> tuple[int, int, int, int]:
    """The largest centred square box (left, top, right, bottom)."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def _decode_resized(
    data: bytes, name: str, size: int, resize: Resize
) -> tuple[Image.Image, tuple[int, int]]:
    """(the resized RGB image, the stored width and height); see `decode_resized`."""
    try:
        source = Image.open(io.BytesIO(data))
        stored = source.size
        if source.width * source.height > MAX_PIXELS:
            raise DataError(
                f"{name}: image of {source.width}x{source.height} pixels is over the limit "
                f"of {MAX_PIXELS:,} (not decoded)"
            )
        source.draft("RGB", (size, size))  # JPEG only: DCT downscale, both sides stay >= size
        img: Image.Image = source
        if _has_orientation(source):
            img = ImageOps.exif_transpose(source)  # EXIF orientation applied
        if img.mode != "RGB":
            img = img.convert("RGB")
        box = centre_square(*img.size) if resize == "crop" else None
        return img.resize((size, size), Image.Resampling.BILINEAR, box=box), stored
    except _DECODE_ERRORS as exc:
        raise DataError(f"{name}: cannot decode image: {userinput.describe(exc)}") from None


def _has_orientation(img: Image.Image) -> bool:
    """Whether the image carries an orientation other than 1 (upright), in EXIF or XMP:
    only then is transposing it worth the copy (Pillow's getexif reads both)."""
    if not any(key in img.info for key in ("exif", "xmp", "XML:com.adobe.xmp")):
        return False
    return img.getexif().get(ORIENTATION_TAG, 1) != 1


ORIENTATION_TAG = 0x0112


def decode_resized(data: bytes, name: str, size: int, resize: Resize = "squash") -> Image.Image:
    """The image as RGB `size` x `size`: `squash` resizes the whole frame, `crop`
    takes the centre square first. DataError naming `name` (the image's full path or
    URI) when undecodable. (serving_graph.py does the same in TensorFlow ops.)"""
    return _decode_resized(data, name, size, resize)[0]


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def resize_jpeg(
    data: bytes, name: str, size: int, resize: Resize = "squash", quality: int = 95
) -> bytes:
    """JPEG bytes of the resized image (see `decode_resized`)."""
    return _jpeg(decode_resized(data, name, size, resize), quality)


@dataclass(frozen=True)
class ImageStats:
    """What the data report needs of one source image."""

    sha256: str  # of the file's bytes: exact duplicates
    width: int  # as stored (before EXIF orientation)
    height: int
    brightness: float  # mean luma (ITU-R 601) of the resized image, 0-255


def resize_with_stats(
    data: bytes, name: str, size: int, resize: Resize, quality: int
) -> tuple[bytes, ImageStats]:
    """`resize_jpeg` and the image's `ImageStats`, from one decode."""
    img, (width, height) = _decode_resized(data, name, size, resize)
    luma = ImageStat.Stat(img.convert("L")).mean[0]
    stats = ImageStats(hashlib.sha256(data).hexdigest(), width, height, round(luma, 3))
    return _jpeg(img, quality), stats


# --- prepare's worker: fetch + resize a chunk of images ------------------------------


@dataclass(frozen=True)
class ResizeJob:
    keys: tuple[str, ...]  # of the images in the source store
    size: int
    resize: Resize
    quality: int
    skip_bad: bool  # undecodable images become a ResizeResult with an error


@dataclass(frozen=True)
class ResizeResult:
    jpeg: bytes | None  # None: skipped, see error
    error: str = ""
    stats: ImageStats | None = None


_SOURCE: Store | None = None


def init_worker(source_uri: str) -> None:
    """Worker initializer: open the store the images are read from."""
    global _SOURCE
    _SOURCE = open_store(source_uri)


def resize_chunk(job: ResizeJob) -> list[ResizeResult]:
    """Fetch and resize each image of `job` (runs in a worker of `ordered_map`)."""
    assert _SOURCE is not None, "init_worker was not called"
    results = []
    for key in job.keys:
        data = _SOURCE.get_bytes(key)
        name = f"{_SOURCE.uri}/{key}"
        try:
            jpeg, stats = resize_with_stats(data, name, job.size, job.resize, job.quality)
            results.append(ResizeResult(jpeg, stats=stats))
        except DataError as exc:
            if not job.skip_bad:
                raise
            results.append(ResizeResult(None, str(exc)))
    return results


# --- process pool for per-image work --------------------------------------------------


def _cgroup_quota(root: Path) -> tuple[int, int] | None:
    """(quota, period) in microseconds from cgroup v2 `cpu.max` or v1 `cpu.cfs_*`;
    None when there is no limit or no cgroup file."""
    try:
        if (root / "cpu.max").exists():
            quota, period = (root / "cpu.max").read_text().split()[:2]
        else:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        if quota in ("max", "-1") or int(period) <= 0:
            return None
        return int(quota), int(period)
    except (OSError, ValueError):
        return None


def available_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota
    (a pod limited to 2 CPUs on a 64-core node gets 2, not 64)."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    count = count or 1
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        count = min(count, max(1, math.ceil(quota[0] / quota[1])))
    return count


def available_memory(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Bytes of memory this process may use: the cgroup limit (v2 `memory.max`, v1
    `memory.limit_in_bytes`) when there is one, else the machine's total."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for name in ("memory.max", "memory/memory.limit_in_bytes"):
        try:
            text = (cgroup_root / name).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return min(total, int(text))  # v1 reports "no limit" as a huge number
    return int(total)


def resolve_workers(workers: int) -> int:
    """`workers`, or one per available CPU when 0."""
    return workers if workers > 0 else available_cpus()


def _ignore_sigint(initializer: Callable[..., None] | None, *args: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    if initializer is not None:
        initializer(*args)


def ordered_map(
    fn: Callable[[T], R],
    tasks: Iterable[T],
    workers: int,
    initializer: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
    window: int = 0,
) -> Iterator[R]:
    """`fn` over `tasks` in `workers` fresh ("spawn") processes, results in task order.

    At most `window` tasks (default 4 per worker) are in flight, so neither the
    tasks nor the results pile up in memory whatever their number. Worker
    exceptions are re-raised here; a worker killed by the OS raises BrokenProcessPool.
    """
    window = window or 4 * workers
    context = multiprocessing.get_context("spawn")  # never fork a process that loaded TF
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_ignore_sigint, initargs=(initializer, *initargs)
    ) as pool:
        pending: deque[Future[R]] = deque()
        try:
            for task in tasks:
                pending.append(pool.submit(fn, task))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
