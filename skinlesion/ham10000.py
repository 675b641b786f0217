"""Reading and validating a HAM10000 tree from any store.

Layout (as the real dataset ships): `HAM10000_metadata.csv` plus the images in
`HAM10000_images_part_1/` and `HAM10000_images_part_2/`. The metadata has the
columns `lesion_id,image_id,dx,dx_type,age,sex,localization`, optionally
followed by `dataset`; columns are matched by name (any order is accepted).
UTF-8 with or without a BOM, LF or CRLF; Latin-1, UTF-16 and other encodings
are refused. Every problem is a DataError of one line naming the file, the
1-based CSV line and the field.
"""

from __future__ import annotations

import csv
import hashlib
import io
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
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


def _text(data: bytes, name: str) -> io.TextIOWrapper:
    """`data` as UTF-8 text (a BOM dropped), checked whole first, then decoded as read
    (a StringIO of the whole text would hold 4 bytes per character)."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{name} line 1: UTF-16 text; save it as UTF-8")
    try:
        data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{name} line {line}: {userinput.describe(exc)}; save it as UTF-8 "
            "(Latin-1 and other encodings are refused)"
        ) from None
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8-sig", newline="")


def parse_metadata(data: bytes, name: str = METADATA) -> pd.DataFrame:
    """Validate the metadata CSV bytes (`name`: its full path, for a decoding error);
    a frame in CSV order with a `line` column. Column by column, with repeated values
    shared and the descriptive columns categorical: a million rows fit in a few hundred MB."""
    reader = csv.reader(_text(data, name))
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{METADATA}: empty file") from None
    _check_header(header)
    names = [h.strip() for h in header]
    columns: dict[str, list[str]] = {n: [] for n in names}
    lines: list[int] = []
    first_image: set[str] = set()
    lesion_dx: dict[str, int] = {}  # lesion_id -> its first row
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
            _check_unique(row, line, columns, lines, first_image, lesion_dx)
            for key, value in row.items():  # repeated values: one shared object
                columns[key].append(value if key == "image_id" else sys.intern(value))
            lines.append(line)
    except csv.Error as exc:
        raise DataError(f"{METADATA} line {reader.line_num}: malformed CSV: {exc}") from None
    del first_image, lesion_dx
    if not lines:
        raise DataError(f"{METADATA}: no rows after the header")
    return _frame(columns, lines)


def _frame(columns: dict[str, list[str]], lines: list[int]) -> pd.DataFrame:
    frame = pd.DataFrame(index=pd.RangeIndex(len(lines)))
    for name in list(columns):
        values = columns.pop(name)
        if name == "dx":
            frame[name] = pd.Categorical(values, categories=CLASSES)
        elif name == "age":  # not used for training
            frame[name] = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce")
        elif name in ("lesion_id", "image_id"):
            frame[name] = pd.Series(values, dtype=object)
        else:
            frame[name] = pd.Categorical(values)
        del values
    frame["line"] = np.asarray(lines, dtype=np.int64)
    return frame


def _check_unique(
    row: dict[str, str],
    line: int,
    columns: dict[str, list[str]],
    lines: list[int],
    first_image: set[str],
    lesion_dx: dict[str, int],
) -> None:
    """`row` against the rows before it (`columns`, `lines`): a new image_id, and its
    lesion's dx as before."""
    image_id, lesion_id, dx = row["image_id"], row["lesion_id"], row["dx"]
    if image_id in first_image:
        first = lines[columns["image_id"].index(image_id)]
        raise _problem(line, "image_id", f"duplicate {image_id!r} (first on line {first})")
    first_image.add(image_id)
    known = lesion_dx.setdefault(lesion_id, len(lines))
    if known < len(lines) and columns["dx"][known] != dx:
        raise _problem(
            line,
            "dx",
            f"lesion {lesion_id!r} is {dx!r} here but {columns['dx'][known]!r} "
            f"on line {lines[known]}",
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
