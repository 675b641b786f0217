"""Object store over URIs: `s3://bucket/prefix` (boto3) and `file:///path`.

The only module that imports boto3. Every object is written with its SHA-256
(S3 metadata / a sidecar-free re-hash for files) and checked on read; S3 calls
retry on 5xx, throttling and connection resets (botocore "standard" mode) and
on checksum mismatches. Credentials come from the standard AWS variables and
are never logged.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote_to_bytes, urlparse

from skinlesion import logs
from skinlesion.errors import InputError, StoreError
from skinlesion.keys import safe_key

CHUNK = 8 * 1024 * 1024
ATTEMPTS = 5  # per S3 call (botocore) and per checksum mismatch (ours)
RETRY_BASE_S = 0.1  # our backoff between whole-transfer attempts: 0.1, 0.2, 0.4, ... s
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


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
    paths = []
    for obj in store.list(prefix):
        target = dest / obj.key[len(prefix) :].lstrip("/") if prefix else dest / obj.key
        target.parent.mkdir(parents=True, exist_ok=True)
        store.get_file(obj.key, target)
        paths.append(target)
    return paths


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


def _rel(parts: tuple[str, ...]) -> str:
    """A child path from user parts: empty parts and trailing '/' are ignored, but an
    absolute part ('/etc') is refused rather than silently made relative."""
    return safe_key("/".join(p.rstrip("/") for p in parts if p.strip("/")), "child path")


# --- local files ----------------------------------------------------------------------


class FileStore:
    """A directory. `root` is a real path (may hold spaces, '%', any letter); `uri` is
    its `file://` URI, percent-encoded once, which `open_store` decodes once."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.uri = self.root.as_uri()
        if self.root.exists() and not self.root.is_dir():
            raise InputError(f"{self.root} is a file, not a directory (a store is a directory)")

    def child(self, *parts: str) -> FileStore:
        return FileStore(self.root / _rel(parts))

    def _path(self, key: str) -> Path:
        return self.root / safe_key(key)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise InputError(f"not found: {self.uri}/{key}") from None

    def put_bytes(self, key: str, data: bytes) -> str:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # atomic: readers never see half a file
        return sha256_bytes(data)

    def get_file(self, key: str, dest: str | Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise InputError(f"not found: {self.uri}/{key}")
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)

    def put_file(self, src: str | Path, key: str) -> str:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        os.close(fd)
        shutil.copyfile(src, tmp)
        digest = sha256_file(tmp)
        if digest != sha256_file(src):
            os.unlink(tmp)
            raise StoreError(f"checksum mismatch writing {self.uri}/{key}")
        os.replace(tmp, path)
        return digest

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        base = self.root / safe_key(prefix) if prefix else self.root
        if not base.is_dir():  # a file named `prefix` is not listed: same as S3
            return []
        out = []
        for path in base.rglob("*"):
            if path.is_file() and not path.name.startswith(".tmp-"):
                out.append(ObjectInfo(path.relative_to(self.root).as_posix(), path.stat().st_size))
        return sorted(out, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    # Conditional writes (run locks): atomic against other processes on this filesystem.

    def put_bytes_if_absent(self, key: str, data: bytes) -> bool:
        """Create `key` holding `data` unless it exists; True when this call created it."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.link(tmp, path)  # atomic, and fails when the name exists: whole file or none
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True

    def swap_bytes(self, key: str, expected: bytes, data: bytes | None) -> bool:
        """Replace `key` with `data` (delete it when None) only if it holds `expected`.

        Serialised by an flock on the key's directory (released by the kernel if the
        process dies); creation through `put_bytes_if_absent` cannot clash with it.
        """
        import fcntl

        path = self._path(key)
        try:
            dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX)
            try:
                current = path.read_bytes()
            except FileNotFoundError:
                return False
            if current != expected:
                return False
            if data is None:
                path.unlink()
            else:
                self.put_bytes(key, data)
            return True
        finally:
            os.close(dir_fd)  # also drops the flock


# --- S3 -------------------------------------------------------------------------------


_LOADER: Any = None  # botocore's JSON model loader, shared by every client


def _s3_client(endpoint: str | None = None) -> Any:
    """A boto3 S3 client; `endpoint` overrides AWS_ENDPOINT_URL(_S3) (tests, proxies)."""
    global _LOADER
    import boto3
    import botocore.session
    from botocore.config import Config
    from botocore.loaders import create_loader

    config = Config(
        retries={"mode": "standard", "total_max_attempts": ATTEMPTS},  # incl. the first
        connect_timeout=10,
        read_timeout=120,
        s3={"addressing_style": "path"},
        request_checksum_calculation="when_supported",
        response_checksum_validation="when_supported",
    )
    endpoint = (
        endpoint
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or None
    )
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    # A fresh session reads credentials from the environment every time; only the
    # (static) service-model loader is shared, which makes a client ~10x cheaper.
    _LOADER = _LOADER or create_loader()
    session = botocore.session.get_session()
    session.register_component("data_loader", _LOADER)
    return boto3.session.Session(botocore_session=session).client(
        "s3", endpoint_url=endpoint, region_name=region, config=config
    )


class _TransferError(StoreError):
    """A response body that arrived cut off or failed botocore's own checksum check:
    botocore does not retry these (they happen after the response headers), we do."""


class S3Store:
    def __init__(self, bucket: str, prefix: str = "", client: Any = None) -> None:
        if not bucket:
            raise InputError("S3 URI needs a bucket: s3://bucket/prefix")
        if not _BUCKET.fullmatch(bucket):
            raise InputError(f"invalid S3 bucket name {bucket!r}: 3-63 of a-z 0-9 . -")
        self.bucket = bucket
        self.prefix = safe_key(prefix.strip("/")) if prefix.strip("/") else ""
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._client = client or _s3_client()

    def child(self, *parts: str) -> S3Store:
        return S3Store(self.bucket, _join(self.prefix, _rel(parts)), self._client)

    def _key(self, key: str) -> str:
        return _join(self.prefix, safe_key(key))

    def _call(self, what: str, key: str, fn: Any, **kwargs: Any) -> Any:
        from boto3.exceptions import RetriesExceededError
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            FlexibleChecksumError,
            IncompleteReadError,
            ResponseStreamingError,
        )

        try:
            return fn(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise InputError(f"not found: {self.uri}/{key}") from None
            if code in ("NoSuchBucket",):
                raise InputError(f"bucket does not exist: s3://{self.bucket}") from None
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
                raise InputError(f"access denied ({code}) to {self.uri}/{key}") from None
            raise StoreError(f"S3 {what} {self.uri}/{key} failed: {code}") from exc
        except (FlexibleChecksumError, IncompleteReadError, ResponseStreamingError) as exc:
            raise _TransferError(f"{type(exc).__name__}: {exc}") from exc
        except BotoCoreError as exc:
            raise StoreError(f"S3 {what} {self.uri}/{key} failed: {type(exc).__name__}") from exc
        except RetriesExceededError as exc:  # s3transfer gave up re-reading a download
            raise StoreError(f"S3 {what} {self.uri}/{key} failed: {exc}") from exc

    def _verified(self, key: str, fetch: Any) -> Any:
        """Run `fetch() -> (result, digest, expected)` until the digest matches (our
        sha256 metadata) and the body arrived whole (botocore's CRC, length)."""
        problem = ""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                result, digest, expected = fetch()
            except _TransferError as exc:
                problem = str(exc)
            else:
                if not expected or digest == expected:
                    return result
                problem = "sha256 checksum mismatch"
            logs.get().warning(
                "transfer_retry", key=f"{self.uri}/{key}", attempt=attempt, problem=problem
            )
            if attempt < ATTEMPTS:
                time.sleep(min(2.0, RETRY_BASE_S * 2 ** (attempt - 1)))
        raise StoreError(f"reading {self.uri}/{key} failed after {ATTEMPTS} attempts: {problem}")

    def get_bytes(self, key: str) -> bytes:
        def fetch() -> tuple[bytes, str, str]:
            resp = self._call("get", key, self._client.get_object, Key=self._key(key))
            data = self._call("read", key, lambda **_: resp["Body"].read())
            return data, sha256_bytes(data), resp.get("Metadata", {}).get("sha256", "")

        return self._verified(key, fetch)  # type: ignore[no-any-return]

    def put_bytes(self, key: str, data: bytes) -> str:
        digest = sha256_bytes(data)
        self._call(
            "put",
            key,
            self._client.put_object,
            Key=self._key(key),
            Body=data,
            Metadata={"sha256": digest},
        )
        return digest

    def get_file(self, key: str, dest: str | Path) -> None:
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)

        def fetch() -> tuple[None, str, str]:
            head = self._call("head", key, self._client.head_object, Key=self._key(key))
            tmp = dest.with_name(f".tmp-{dest.name}")
            try:
                self._call(
                    "download",
                    key,
                    self._client.download_file,
                    Key=self._key(key),
                    Filename=str(tmp),
                )
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            digest = sha256_file(tmp)
            expected = head.get("Metadata", {}).get("sha256", "")
            if not expected or digest == expected:
                os.replace(tmp, dest)
            else:
                tmp.unlink(missing_ok=True)
            return None, digest, expected

        self._verified(key, fetch)

    def put_file(self, src: str | Path, key: str) -> str:
        digest = sha256_file(src)
        self._call(
            "upload",
            key,
            self._client.upload_file,
            Filename=str(src),
            Key=self._key(key),
            ExtraArgs={"Metadata": {"sha256": digest}},
        )
        return digest

    def exists(self, key: str) -> bool:
        try:
            self._call("head", key, self._client.head_object, Key=self._key(key))
        except InputError as exc:
            if str(exc).startswith("not found"):
                return False
            raise
        return True

    def _iter(self, prefix: str) -> Iterator[ObjectInfo]:
        full = _join(self.prefix, safe_key(prefix)) if prefix else self.prefix
        paginator = self._client.get_paginator("list_objects_v2")
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": f"{full}/" if full else ""}
        pages = self._call(
            "list",
            prefix,
            lambda **kw: list(paginator.paginate(**kw)),
            **{k: v for k, v in kwargs.items() if k != "Bucket"},
        )
        strip = len(self.prefix) + 1 if self.prefix else 0
        for page in pages:
            for obj in page.get("Contents", []):
                yield ObjectInfo(obj["Key"][strip:], int(obj["Size"]))

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        return sorted(self._iter(prefix), key=lambda o: o.key)

    def delete(self, key: str) -> None:
        self._call("delete", key, self._client.delete_object, Key=self._key(key))

    # Conditional writes (run locks): S3 conditional requests decide races on the server.

    def _conditional(self, what: str, key: str, fn: Any, **kwargs: Any) -> bool:
        """Call `fn`; False when the server refused its precondition (412, or 409 for a
        concurrent conditional write), True when it succeeded."""
        from botocore.exceptions import ClientError

        def call(**kw: Any) -> bool:
            try:
                fn(**kw)
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                    return False
                raise
            return True

        return bool(self._call(what, key, call, **kwargs))

    def _put_if(self, key: str, data: bytes, **condition: str) -> bool:
        """put_object with a precondition (IfNoneMatch / IfMatch); False when it fails."""
        return self._conditional(
            "put",
            key,
            self._client.put_object,
            Key=self._key(key),
            Body=data,
            Metadata={"sha256": sha256_bytes(data)},
            **condition,
        )

    def put_bytes_if_absent(self, key: str, data: bytes) -> bool:
        """Create `key` holding `data` unless it exists (`If-None-Match: *`)."""
        return self._put_if(key, data, IfNoneMatch="*")

    def swap_bytes(self, key: str, expected: bytes, data: bytes | None) -> bool:
        """Replace `key` with `data` (delete it when None) only if it holds `expected`:
        the body is compared here, then the write carries `If-Match` with its ETag."""
        try:
            resp = self._call("get", key, self._client.get_object, Key=self._key(key))
        except InputError as exc:
            if str(exc).startswith("not found"):
                return False
            raise
        current = self._call("read", key, lambda **_: resp["Body"].read())
        if current != expected:
            return False
        etag = resp["ETag"]
        if data is None:
            return self._conditional(
                "delete", key, self._client.delete_object, Key=self._key(key), IfMatch=etag
            )
        return self._put_if(key, data, IfMatch=etag)


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
