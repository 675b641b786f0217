"""Object store over URIs: `s3://bucket/prefix` (s3.py, boto3) and `file:///path` (files.py).

Every object is written with its SHA-256 (S3 metadata / a sidecar-free re-hash for
files) and checked on read. base.py holds the Store protocol both follow and the
helpers over any store; `open_store` picks the backend from the URI.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote_to_bytes, urlparse

from skinlesion.errors import InputError
from skinlesion.storage.base import (
    ObjectInfo,
    Store,
    download_prefix,
    get_json,
    put_json,
    sha256_bytes,
    sha256_file,
)
from skinlesion.storage.files import FileStore
from skinlesion.storage.s3 import S3Store

__all__ = [
    "FileStore",
    "ObjectInfo",
    "S3Store",
    "Store",
    "check_inside",
    "download_prefix",
    "file_uri_path",
    "get_json",
    "open_store",
    "put_json",
    "sha256_bytes",
    "sha256_file",
]


def file_uri_path(uri: str) -> Path:
    """The local path of a `file:///abs/path` URI, percent-decoded once (the inverse of
    `Path.as_uri()`, so `%20` is a space and `%25` a '%'; bytes that are not UTF-8 come
    back as the same file name)."""
    parsed = urlparse(uri)
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
        raise InputError(f"file URI must be file:///absolute/path, got {uri!r}")
    if parsed.query or parsed.fragment or parsed.params:
        raise InputError(
            f"file URI {uri!r} has a '?', '#' or ';' part: percent-encode those characters "
            "(%3F, %23, %3B) or give a plain path"
        )
    return Path(os.fsdecode(unquote_to_bytes(parsed.path)))


def open_store(uri: str) -> Store:
    """`s3://bucket/prefix`, `file:///abs/path` (percent-encoded) or a plain local path
    (taken as it is: never decoded). `open_store(store.uri)` is the same store."""
    if not uri:
        raise InputError("empty store URI")
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if parsed.query or parsed.fragment or parsed.params:
            raise InputError(f"S3 URI must be s3://bucket/prefix, got {uri!r}")
        return S3Store(parsed.netloc, parsed.path)
    if parsed.scheme == "file":
        return FileStore(file_uri_path(uri))
    if parsed.scheme == "":
        return FileStore(uri)
    raise InputError(
        f"unsupported store URI scheme '{parsed.scheme}' in {uri!r} (s3:// or file://)"
    )


def check_inside(store_uri: str, uri: str) -> None:
    """Refuse a prefix of a store that leads out of it (a symlinked directory of a file
    store): the store's writes would land elsewhere on the disk."""
    store, sub = open_store(store_uri), open_store(uri)
    if not (isinstance(store, FileStore) and isinstance(sub, FileStore)):
        return
    if not sub.root.is_relative_to(store.root):
        raise InputError(f"{uri} leads out of the store {store.uri} (a symlink): refused")
