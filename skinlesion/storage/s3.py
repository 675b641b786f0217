"""A store under an S3 prefix (`s3://bucket/prefix`): the only module that imports boto3.

Every object is written with its SHA-256 in the object's metadata and checked on read;
calls retry on 5xx, throttling and connection resets (botocore "standard" mode) and on
checksum mismatches. Credentials come from the standard AWS variables and are never logged.

Data movement: one client per process and connection settings (endpoint, region,
credentials), shared by every store and thread; files go through boto3's transfer manager
(multipart, parallel parts above `MULTIPART_BYTES`), and `put_files` / `get_files` move
many files at once, `FILE_WORKERS` in parallel (`make bench`: `store_speedup`).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, TypeVar

from skinlesion import faults, logs
from skinlesion.errors import InputError, StoreError
from skinlesion.keys import safe_key
from skinlesion.storage.base import (
    Done,
    Download,
    ObjectInfo,
    Upload,
    child_key,
    in_order,
    join_keys,
    sha256_bytes,
    sha256_file,
)

T = TypeVar("T")

ATTEMPTS = 5  # per S3 call (botocore) and per checksum mismatch (ours)
RETRY_BASE_S = 0.1  # our backoff between whole-transfer attempts: 0.1, 0.2, 0.4, ... s
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")

# Transfers: files above MULTIPART_BYTES go in parts of that size, PART_WORKERS at a time;
# put_files / get_files move FILE_WORKERS files at once. Measured on SeaweedFS (make bench).
MULTIPART_BYTES = 8 * 1024 * 1024
PART_WORKERS = 4
FILE_WORKERS = 8
_POOL = FILE_WORKERS * PART_WORKERS  # HTTP connections a client keeps

_LOADER: Any = None  # botocore's JSON model loader, shared by every client
_CLIENTS: dict[str, Any] = {}  # one client per connection settings, for the process
_CLIENTS_LOCK = threading.Lock()
# What a client's connection and credentials come from (read when it is made).
_CLIENT_ENV = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
)


def _transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=MULTIPART_BYTES,
        multipart_chunksize=MULTIPART_BYTES,
        max_concurrency=PART_WORKERS,
        use_threads=True,
    )


def _shared_client(endpoint: str | None = None) -> Any:
    """The process's client for the current settings: made once, then reused by every
    store (a client is thread-safe; making one costs tens of milliseconds). Keyed by a
    digest of the settings, so changed credentials get a new client and no secret is kept
    in the key."""
    settings = "\0".join([endpoint or "", *(os.environ.get(k, "") for k in _CLIENT_ENV)])
    key = hashlib.sha256(settings.encode()).hexdigest()
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            client = _CLIENTS[key] = _s3_client(endpoint)
        return client


def _s3_client(endpoint: str | None = None) -> Any:
    """A new boto3 S3 client; `endpoint` overrides AWS_ENDPOINT_URL(_S3) (tests, proxies)."""
    global _LOADER
    import boto3
    import botocore.session
    from botocore.config import Config
    from botocore.loaders import create_loader

    config = Config(
        retries={"mode": "standard", "total_max_attempts": ATTEMPTS},  # incl. the first
        connect_timeout=10,
        read_timeout=120,
        max_pool_connections=_POOL,
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
    # A fresh session reads credentials from the environment; only the (static)
    # service-model loader is shared, which makes a client ~10x cheaper.
    _LOADER = _LOADER or create_loader()
    session = botocore.session.get_session()
    session.register_component("data_loader", _LOADER)
    return boto3.session.Session(botocore_session=session).client(
        "s3", endpoint_url=endpoint, region_name=region, config=config
    )


def _parallel(fn: Any, items: Sequence[T], done: Done[T] | None = None) -> list[Any]:
    """fn over items in FILE_WORKERS threads, results in order; the first error raised.
    `done(item)` is called in this thread as each item finishes (progress bars)."""
    if len(items) <= 1:
        return in_order(fn, items, done)
    results: list[Any] = [None] * len(items)
    with ThreadPoolExecutor(min(FILE_WORKERS, len(items)), "s3-transfer") as pool:
        futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
        try:
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                if done is not None:
                    done(items[futures[future]])
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return results


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
        self._client = client or _shared_client()

    def child(self, *parts: str) -> S3Store:
        return S3Store(self.bucket, join_keys(self.prefix, child_key(parts)), self._client)

    def _key(self, key: str) -> str:
        return join_keys(self.prefix, safe_key(key))

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
                    Config=_transfer_config(),
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
            Config=_transfer_config(),
        )
        faults.point("upload")
        return digest

    def put_files(self, items: Sequence[Upload], done: Done[Upload] | None = None) -> list[str]:
        """`put_file` of every (source, key), FILE_WORKERS at once; their SHA-256s."""
        return _parallel(lambda item: self.put_file(*item), items, done)

    def get_files(self, items: Sequence[Download], done: Done[Download] | None = None) -> None:
        """`get_file` of every (key, destination), FILE_WORKERS at once."""
        _parallel(lambda item: self.get_file(*item), items, done)

    def exists(self, key: str) -> bool:
        try:
            self._call("head", key, self._client.head_object, Key=self._key(key))
        except InputError as exc:
            if str(exc).startswith("not found"):
                return False
            raise
        return True

    def _iter(self, prefix: str) -> Iterator[ObjectInfo]:
        full = join_keys(self.prefix, safe_key(prefix)) if prefix else self.prefix
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
