"""Augment stage: balance the training set with flipped / shifted / zoomed / rotated variants.

Reads the prepared train shards, and for every class except `cfg.exclude` writes
augmented variants until the class holds the target count (the reference
procedure balances to about 6,000 images per class; `scale_to_data` scales that
by train size / 8,012 so small data sets get a proportional target). Originals
are written unchanged; the val split is not touched (train reads it from
prepare).

Streaming: pass 1 walks the shards once and keeps, per class, only the byte
offsets of its records; pass 2 reads sources back by offset and writes every
output example straight through `ShardWriter`. Memory depends on the number of
source images, never on the target. The output order interleaves the classes in
proportion to their final counts, so any window of the shards holds mixed
classes, and round-robins over each class's sources (item i of a class is
source i mod n, round i div n; round 0 is the original).

Reproducible: each variant's random parameters come from a generator seeded by
(seed, source image_id, variant number), so a variant does not depend on the
order in which it is made, and the same seed gives byte-identical shards.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import json
import math
import struct
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from PIL import Image

from skinlesion import config, faults, logs, shards
from skinlesion.classes import CLASSES, NUM_CLASSES
from skinlesion.config import AugmentConfig, to_dict
from skinlesion.errors import DataError
from skinlesion.manifest import commit_stage, input_fingerprints, read_result
from skinlesion.results import AugmentResult, PrepareResult
from skinlesion.scratch import scratch_dir
from skinlesion.storage import Store

STAGE = "augment"
REFERENCE_TRAIN_SIZE = 8012  # train images of the reference 80/20 split of HAM10000
SAMPLE_VARIANTS = 5  # variants per row of augment_samples.png


# --- targets ------------------------------------------------------------------------------


def effective_target(cfg: AugmentConfig, n_train: int) -> int:
    """Images per class after balancing: the configured target, scaled for small data."""
    if not cfg.scale_to_data:
        return cfg.target_per_class
    return max(1, round(cfg.target_per_class * n_train / REFERENCE_TRAIN_SIZE))


def class_totals(cfg: AugmentConfig, before: Mapping[str, int], target: int) -> dict[str, int]:
    """Final count per class: the target, never below the class's own count.

    Excluded classes, and classes with no train image (nothing to augment), stay as
    they are.
    """
    out = {}
    for name in CLASSES:
        n = before.get(name, 0)
        out[name] = n if name in cfg.exclude or n == 0 else max(n, target)
    return out


# --- transforms ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Params:
    """One variant's geometry. Shifts are fractions of the image side; zoom > 1 enlarges."""

    flip_h: bool = False
    flip_v: bool = False
    angle_deg: float = 0.0
    zoom: float = 1.0
    shift_x: float = 0.0
    shift_y: float = 0.0


def variant_rng(seed: int, image_id: str, variant: int) -> np.random.Generator:
    """A generator that depends only on (seed, source image, variant number)."""
    digest = hashlib.sha256(f"{seed}\0{image_id}\0{variant}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def sample_params(cfg: AugmentConfig, rng: np.random.Generator) -> Params:
    """Random flips, rotation in +/- rotation_deg, isotropic zoom in 1 +/- zoom, shifts."""
    u = rng.uniform(-1.0, 1.0, size=4)
    flips = rng.random(2) < 0.5
    return Params(
        flip_h=bool(cfg.flip and flips[0]),
        flip_v=bool(cfg.flip and flips[1]),
        angle_deg=float(u[0] * cfg.rotation_deg),
        zoom=float(1.0 + u[1] * cfg.zoom),
        shift_x=float(u[2] * cfg.shift),
        shift_y=float(u[3] * cfg.shift),
    )


def apply_params(image: np.ndarray, p: Params) -> np.ndarray:
    """Apply `p` to an H x W x 3 uint8 image; same shape and dtype.

    One bilinear affine warp about the image centre. Pixels that map outside the
    source are filled by mirror reflection (lesion images have no meaningful
    border), so no black corners appear.
    """
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an H x W x C uint8 image, got {image.shape} {image.dtype}")
    h, w = image.shape[:2]
    cx, cy = w / 2.0, h / 2.0
    theta = math.radians(p.angle_deg)
    cos, sin = math.cos(theta) / p.zoom, math.sin(theta) / p.zoom
    fx = -1.0 if p.flip_h else 1.0
    fy = -1.0 if p.flip_v else 1.0
    # Inverse map (output pixel -> source pixel): flip * rotate(-theta) / zoom about the centre.
    a, b = fx * cos, fx * sin
    d, e = -fy * sin, fy * cos
    tx, ty = cx + p.shift_x * w, cy + p.shift_y * h  # where the source centre lands

    def inverse(x: float, y: float) -> tuple[float, float]:
        return a * (x - tx) + b * (y - ty) + cx, d * (x - tx) + e * (y - ty) + cy

    corners = [inverse(x, y) for x in (0.0, float(w)) for y in (0.0, float(h))]
    pad_x = max(0, math.ceil(max(max(-x, x - w) for x, _ in corners))) + 2
    pad_y = max(0, math.ceil(max(max(-y, y - h) for _, y in corners))) + 2
    padded = np.pad(image, ((pad_y, pad_y), (pad_x, pad_x), (0, 0)), mode="symmetric")
    c = a * -tx + b * -ty + cx + pad_x
    f = d * -tx + e * -ty + cy + pad_y
    warped = Image.fromarray(padded).transform(
        (w, h), Image.Transform.AFFINE, (a, b, c, d, e, f), resample=Image.Resampling.BILINEAR
    )
    return np.asarray(warped, dtype=np.uint8)


def augment_image(image: np.ndarray, cfg: AugmentConfig, image_id: str, variant: int) -> np.ndarray:
    """Variant number `variant` (>= 1) of the source image `image_id`."""
    return apply_params(image, sample_params(cfg, variant_rng(cfg.seed, image_id, variant)))


def variant_id(image_id: str, variant: int) -> str:
    return f"{image_id}_aug{variant:04d}"


def decode_jpeg(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# --- the output plan ----------------------------------------------------------------------


def plan(sources: Sequence[int], totals: Sequence[int]) -> Iterator[tuple[int, int, int]]:
    """Lazily yield (label, source index, round) for every output example.

    Class `label` has `sources[label]` source images and ends with `totals[label]`
    examples; its item i is source i mod n in round i div n (round 0 = the original).
    Classes are merged in proportion to their totals (item i sits at (i + 1/2) /
    total), so every stretch of the output mixes the classes.
    """

    def one_class(label: int) -> Iterator[tuple[float, int, int, int]]:
        n, total = sources[label], totals[label]
        for i in range(total if n else 0):
            yield (i + 0.5) / total, label, i % n, i // n

    merged = heapq.merge(*(one_class(label) for label in range(len(totals))))
    for _, label, source, round_ in merged:
        yield label, source, round_


# --- reading records back by offset ---------------------------------------------------------

_HEADER = struct.Struct("<QI")  # record length, masked CRC of the length
_FOOTER = 4  # masked CRC of the data


def record_offsets(path: Path) -> list[tuple[int, int]]:
    """(data offset, length) of every record of a TFRecord file, by walking its headers."""
    out = []
    size = path.stat().st_size
    with open(path, "rb") as fh:
        pos = 0
        while pos < size:
            header = fh.read(_HEADER.size)
            if len(header) < _HEADER.size:
                raise DataError(f"{path.name}: truncated TFRecord header at byte {pos}")
            length, _ = _HEADER.unpack(header)
            start = pos + _HEADER.size
            pos = start + length + _FOOTER
            if pos > size:
                raise DataError(f"{path.name}: truncated TFRecord record at byte {start}")
            out.append((start, length))
            fh.seek(pos)
    return out


class SourceIndex:
    """Per-class (shard, offset, length) of the train records: all that pass 2 keeps."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)
        self.by_label: list[list[tuple[int, int, int]]] = [[] for _ in range(NUM_CLASSES)]
        self._files: dict[int, Any] = {}
        import tensorflow as tf

        for shard, path in enumerate(self.paths):
            offsets = record_offsets(path)
            # TF's reader checks the CRCs; the header walk gives the offsets. Both must agree.
            try:
                pairs = zip(offsets, shards.iter_examples([path]), strict=True)
                for n, ((start, length), ex) in enumerate(pairs):
                    if not 0 <= ex.label < NUM_CLASSES:
                        raise DataError(
                            f"{path.name}: record {n} ({ex.image_id}): bad label {ex.label}"
                        )
                    self.by_label[ex.label].append((shard, start, length))
            except ValueError:
                raise DataError(f"{path.name}: record count differs from its headers") from None
            except tf.errors.OpError as exc:
                raise DataError(f"{path.name}: unreadable shard: {exc.message}") from None

    def counts(self) -> dict[str, int]:
        return {name: len(self.by_label[i]) for i, name in enumerate(CLASSES)}

    def read(self, label: int, i: int) -> shards.Example:
        shard, start, length = self.by_label[label][i]
        fh = self._files.get(shard)
        if fh is None:
            fh = self._files[shard] = open(self.paths[shard], "rb")  # noqa: SIM115
        fh.seek(start)
        ex = shards.decode(fh.read(length))
        if ex.label != label:
            raise DataError(f"{self.paths[shard].name}: record at byte {start} changed")
        return ex

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files.clear()

    def __enter__(self) -> SourceIndex:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def generate(
    index: SourceIndex, cfg: AugmentConfig, totals: Mapping[str, int], quality: int
) -> Iterator[shards.Example]:
    """Lazily yield every output example (originals unchanged, and variants)."""
    sources = [len(index.by_label[i]) for i in range(NUM_CLASSES)]
    for label, source, round_ in plan(sources, [totals[name] for name in CLASSES]):
        ex = index.read(label, source)
        if round_ == 0:
            yield ex
            continue
        image = augment_image(decode_jpeg(ex.jpeg), cfg, ex.image_id, round_)
        yield shards.Example(
            jpeg=encode_jpeg(image, quality),
            label=label,
            image_id=variant_id(ex.image_id, round_),
            lesion_id=ex.lesion_id,
        )


# --- the stage ----------------------------------------------------------------------------


def _samples(
    index: SourceIndex, cfg: AugmentConfig, totals: Mapping[str, int], quality: int
) -> list[tuple[str, np.ndarray, list[np.ndarray], str]]:
    """(class, original, its first variants as written, note) for the samples figure."""
    rows = []
    for label, name in enumerate(CLASSES):
        n = len(index.by_label[label])
        if n == 0:
            continue
        ex = index.read(label, 0)
        original = decode_jpeg(ex.jpeg)
        made = (totals[name] - 1) // n  # rounds of variants source 0 received
        variants = [
            decode_jpeg(encode_jpeg(augment_image(original, cfg, ex.image_id, r), quality))
            for r in range(1, min(made, SAMPLE_VARIANTS) + 1)
        ]
        note = ""
        if not variants:
            note = "excluded" if name in cfg.exclude else "at or above target"
        rows.append((name, original, variants, note))
    return rows


def run_augment(
    cfg: AugmentConfig, prepared: Store, out: Store, force: bool = False
) -> dict[str, Any]:
    """Balance the prepared train split into `out`; returns the committed manifest."""
    log = logs.get()
    settings = config.stage_settings(STAGE, cfg)
    inputs = input_fingerprints({"prepared": prepared.uri})
    _, prep = read_result(prepared, PrepareResult, "prepared")

    def body(work: Path) -> AugmentResult:
        from skinlesion.plots import augment as plots

        with scratch_dir("skinlesion-augment-in-") as tmp:
            paths = shards.fetch_split(prepared, prep.shards, "train", tmp)
            quality = prep.preprocessing.jpeg_quality
            with SourceIndex(paths) as index:
                before = index.counts()
                n_train = sum(before.values())
                if n_train == 0:
                    raise DataError(f"{prepared.uri}: the prepared train split is empty")
                target = effective_target(cfg, n_train)
                totals = class_totals(cfg, before, target)
                for name in CLASSES:
                    if before[name] == 0 and name not in cfg.exclude:
                        log.warning("class_missing", cls=name, detail="no train image to augment")
                n_out = sum(totals.values())
                log.info("augment_plan", before=before, target=target, after=totals)
                start = time.monotonic()
                with shards.ShardWriter(work, "train", cfg.shard_size) as writer:
                    for ex in logs.progress(
                        generate(index, cfg, totals, quality), n_out, STAGE, "image"
                    ):
                        writer.write(ex)
                        faults.point("image")
                seconds = time.monotonic() - start
                shard_list = writer.close()
                rows = _samples(index, cfg, totals, quality)
        plots.class_balance(before, totals, target, cfg.exclude, work / "class_balance.png")
        plots.augment_samples(rows, work / "augment_samples.png")
        (work / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")
        variants = n_out - n_train
        log.info(
            "augment_done",
            before=before,
            after=totals,
            target=target,
            variants=variants,
            n_images=n_out,
            seconds=round(seconds, 2),
            images_per_s=round(n_out / seconds, 1) if seconds > 0 else None,
            variants_per_s=round(variants / seconds, 1) if seconds > 0 else None,
        )
        return AugmentResult(
            shards={"train": shard_list},
            counts={"before": before, "after": totals},
            target=target,
            variants=variants,
            n_images=n_out,
            image_size=prep.image_size,
            synthetic=prep.synthetic,
        )

    return commit_stage(
        STAGE, out, settings, inputs, body, force, input_uris={"prepared": prepared.uri}
    )
