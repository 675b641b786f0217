"""What every object store is: the Store protocol, checksums and JSON/prefix helpers."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from skinlesion.errors import InputError
from skinlesion.keys import safe_key

CHUNK = 8 * 1024 * 1024
T = TypeVar("T")
Upload = tuple[str | Path, str]  # (local source, key)
Download = tuple[str, str | Path]  # (key, local destination)
Done = Callable[[T], None]  # called with each item of put_files / get_files as it finishes


def in_order(fn: Callable[[T], Any], items: Sequence[T], done: Done[T] | None) -> list[Any]:
    """`fn` over `items` one after another, `done(item)` after each; the results."""
    results = []
    for item in items:
        results.append(fn(item))
        if done is not None:
            done(item)
    return results


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the store's prefix
    size: int


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


class Store(Protocol):
    """A prefix in an object store. Keys are relative, '/'-separated, validated.

    `list(prefix)` has directory semantics on every backend: it returns the objects
    *under* `prefix/` (keys relative to the store), never an object named `prefix`.
    """

    uri: str

    def child(self, *parts: str) -> Store: ...
    def get_bytes(self, key: str) -> bytes: ...
    def put_bytes(self, key: str, data: bytes) -> str: ...
    def get_file(self, key: str, dest: str | Path) -> None: ...
    def put_file(self, src: str | Path, key: str) -> str: ...
    def put_files(self, items: Sequence[Upload], done: Done[Upload] | None = None) -> list[str]: ...
    def get_files(self, items: Sequence[Download], done: Done[Download] | None = None) -> None: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str = "") -> list[ObjectInfo]: ...
    def delete(self, key: str) -> None: ...
    def put_bytes_if_absent(self, key: str, data: bytes) -> bool: ...
    def swap_bytes(self, key: str, expected: bytes, data: bytes | None) -> bool: ...


def get_json(store: Store, key: str) -> Any:
    data = store.get_bytes(key)
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise InputError(f"{store.uri}/{key}: invalid JSON: {exc}") from None


def put_json(store: Store, key: str, value: Any) -> str:
    return store.put_bytes(key, json.dumps(value, indent=2, sort_keys=True).encode() + b"\n")


def download_prefix(store: Store, prefix: str, dest: Path) -> list[Path]:
    """Copy every object under `prefix` into `dest`, keeping relative paths."""
    items = []
    for obj in store.list(prefix):
        target = dest / obj.key[len(prefix) :].lstrip("/") if prefix else dest / obj.key
        items.append((obj.key, target))
    store.get_files(items)
    return [target for _, target in items]


def join_keys(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


def child_key(parts: tuple[str, ...]) -> str:
    """A child path from user parts: empty parts and trailing '/' are ignored, but an
    absolute part ('/etc') is refused rather than silently made relative."""
    return safe_key("/".join(p.rstrip("/") for p in parts if p.strip("/")), "child path")
