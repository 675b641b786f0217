"""Reading and validating a HAM10000 tree from any store.

Layout (as the real dataset ships): `HAM10000_metadata.csv` plus the images in
`HAM10000_images_part_1/` and `HAM10000_images_part_2/`. The metadata has the
columns `lesion_id,image_id,dx,dx_type,age,sex,localization`, optionally
followed by `dataset`. Every problem is a DataError of one line naming the
file, the 1-based CSV line and the field.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Iterable
from dataclasses import dataclass

import pandas as pd

from skinlesion import userinput
from skinlesion.classes import CLASSES
from skinlesion.errors import DataError, InputError
from skinlesion.keys import safe_segment
from skinlesion.storage import Store

METADATA = "HAM10000_metadata.csv"
PARTS = ("HAM10000_images_part_1", "HAM10000_images_part_2")
SYNTHETIC_MARKER = "SYNTHETIC.json"
COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
OPTIONAL_COLUMNS = ("dataset",)
IMAGE_SUFFIXES = (".jpg", ".jpeg")


@dataclass(frozen=True)
class Ham10000:
    """A validated tree. `metadata` keeps CSV order and adds `line` (CSV line) and,
    once images are located, `key` (the image's key in `store`)."""

    store: Store
    metadata: pd.DataFrame
    synthetic: bool


def _problem(line: int, field: str, message: str) -> DataError:
    return DataError(f"{METADATA} line {line}: field '{field}': {message}")


def _check_header(header: list[str]) -> None:
    names = [h.strip() for h in header]
    if len(names) == 1:
        for name, sep in (("';'", ";"), ("tab", "\t"), ("'|'", "|")):
            if len(names[0].split(sep)) >= len(COLUMNS):
                raise DataError(
                    f"{METADATA} line 1: the delimiter looks wrong: columns are separated by "
                    f"{name}, expected ',' (save it as comma-separated CSV)"
                )
    for name in COLUMNS:
        if name not in names:
            raise DataError(
                f"{METADATA} line 1: missing required column '{name}' "
                f"(expected {','.join(COLUMNS)}[,{','.join(OPTIONAL_COLUMNS)}])"
            )
    seen: set[str] = set()
    for name in names:
        if name not in COLUMNS and name not in OPTIONAL_COLUMNS:
            raise DataError(
                f"{METADATA} line 1: unknown column '{name}' "
                f"(expected {','.join(COLUMNS)} and optionally '{OPTIONAL_COLUMNS[0]}')"
            )
        if name in seen:
            raise DataError(f"{METADATA} line 1: column '{name}' appears twice")
        seen.add(name)


def _check_row(row: dict[str, str], line: int) -> None:
    for field in ("lesion_id", "image_id", "dx"):
        if not row[field]:
            raise _problem(line, field, "empty value")
    for field in ("lesion_id", "image_id"):
        try:
            safe_segment(row[field], field)
        except InputError:
            raise _problem(
                line, field, f"unsafe value {row[field]!r} (letters, digits and . _ = - only)"
            ) from None
    if row["dx"] not in CLASSES:
        raise _problem(
            line, "dx", f"unknown class {row['dx']!r} (expected one of {', '.join(CLASSES)})"
        )


def _decode(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: {userinput.describe(exc)}") from None


def parse_metadata(data: bytes, name: str = METADATA) -> pd.DataFrame:
    """Validate the metadata CSV bytes (`name`: its full path, for a decoding error);
    a frame in CSV order with a `line` column."""
    reader = csv.reader(io.StringIO(_decode(data, name), newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{METADATA}: empty file") from None
    _check_header(header)
    names = [h.strip() for h in header]
    rows: list[dict[str, str]] = []
    lines: list[int] = []
    first_image: dict[str, int] = {}
    lesion_dx: dict[str, tuple[str, int]] = {}
    try:
        for fields in reader:
            line = reader.line_num
            if not any(f.strip() for f in fields):
                continue  # blank line
            if len(fields) != len(names):
                raise DataError(
                    f"{METADATA} line {line}: expected {len(names)} fields, got {len(fields)}"
                )
            row = {name: value.strip() for name, value in zip(names, fields, strict=True)}
            _check_row(row, line)
            _check_unique(row, line, first_image, lesion_dx)
            rows.append(row)
            lines.append(line)
    except csv.Error as exc:
        raise DataError(f"{METADATA} line {reader.line_num}: malformed CSV: {exc}") from None
    if not rows:
        raise DataError(f"{METADATA}: no rows after the header")
    frame = pd.DataFrame(rows, columns=names)
    frame["line"] = lines
    frame["age"] = pd.to_numeric(frame["age"], errors="coerce")  # not used for training
    return frame


def _check_unique(
    row: dict[str, str],
    line: int,
    first_image: dict[str, int],
    lesion_dx: dict[str, tuple[str, int]],
) -> None:
    image_id, lesion_id, dx = row["image_id"], row["lesion_id"], row["dx"]
    if image_id in first_image:
        raise _problem(
            line, "image_id", f"duplicate {image_id!r} (first on line {first_image[image_id]})"
        )
    first_image[image_id] = line
    known = lesion_dx.setdefault(lesion_id, (dx, line))
    if known[0] != dx:
        raise _problem(
            line,
            "dx",
            f"lesion {lesion_id!r} is {dx!r} here but {known[0]!r} on line {known[1]}",
        )


def read_metadata(store: Store) -> pd.DataFrame:
    """The validated metadata of the tree at `store` (reads no image)."""
    if not store.exists(METADATA):
        raise DataError(f"{METADATA}: not found in {store.uri} (is this a HAM10000 tree?)")
    return parse_metadata(store.get_bytes(METADATA), f"{store.uri}/{METADATA}")


def list_images(store: Store) -> dict[str, str]:
    """image_id -> key, from one listing of each image part (the first part wins)."""
    found: dict[str, str] = {}
    for part in PARTS:
        for obj in store.list(part):
            name = obj.key.rsplit("/", 1)[-1]
            stem, dot, suffix = name.rpartition(".")
            if dot and f".{suffix.lower()}" in IMAGE_SUFFIXES:
                found.setdefault(stem, obj.key)
    return found


def locate_images(frame: pd.DataFrame, found: dict[str, str]) -> pd.DataFrame:
    """Add the `key` column; fail on the first listed image that is not in the tree."""
    keys = frame["image_id"].map(found)
    missing = keys.isna()
    if missing.any():
        row = frame[missing].iloc[0]
        raise _problem(
            int(row["line"]),
            "image_id",
            f"image {row['image_id']!r} not found in {PARTS[0]}/ or {PARTS[1]}/ "
            f"({int(missing.sum())} missing in all)",
        )
    return frame.assign(key=keys)


def is_synthetic(store: Store) -> bool:
    return store.exists(SYNTHETIC_MARKER)


def load(store: Store, with_images: bool = True) -> Ham10000:
    """Read and validate a tree; with `with_images`, also locate every image."""
    frame = read_metadata(store)
    if with_images:
        frame = locate_images(frame, list_images(store))
    return Ham10000(store=store, metadata=frame, synthetic=is_synthetic(store))


def _listing_lines(store: Store, parts: Iterable[str]) -> list[str]:
    return sorted(f"{obj.key}\t{obj.size}" for part in parts for obj in store.list(part))


def raw_fingerprint(store: Store) -> str:
    """sha256 of the metadata bytes, the synthetic marker's presence and the sorted
    (key, size) listing of the image parts: changes whenever the input data does."""
    if not store.exists(METADATA):
        raise DataError(f"{METADATA}: not found in {store.uri} (is this a HAM10000 tree?)")
    h = hashlib.sha256(store.get_bytes(METADATA))
    h.update(f"\nsynthetic={is_synthetic(store)}\n".encode())
    for line in _listing_lines(store, PARTS):
        h.update(line.encode() + b"\n")
    return h.hexdigest()
