"""Store benchmark: shard upload + download through `S3Store` against a plain loop.

On a real SeaweedFS S3 server (tests/s3server.py), the same files (shard-sized, random
bytes like JPEG records) are moved three ways, each timed for the upload of every file and
the download of every file back:

- plain: one thread, one boto3 client with its defaults, `put_object` (body read from the
  file) then `get_object` (body written to a file), file after file;
- store: `S3Store.put_files` / `get_files` (the code the stages use: one shared client,
  boto3's transfer manager with multipart parts, several files at once, SHA-256 written
  and checked);
- crt: the same transfers through boto3's CRT-based transfer manager, when `awscrt` is
  installed (`pip install 'boto3[crt]'`), else reported as skipped.

`store_speedup` is the store's MB/s (bytes up + bytes down over the two phases' time)
over the plain loop's. Environment: STORE_BENCH_FILES (default 12), STORE_BENCH_MB
(default 16).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from skinlesion.storage import S3Store
from tests import s3server


def _plain(server: s3server.S3Server, files: list[Path], prefix: str, back: Path) -> float:
    import boto3

    client = boto3.session.Session().client(
        "s3",
        endpoint_url=server.endpoint,
        region_name=server.region,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
    )
    start = time.perf_counter()
    for path in files:
        client.put_object(Bucket=server.bucket, Key=f"{prefix}/{path.name}", Body=path.read_bytes())
    for path in files:
        body = client.get_object(Bucket=server.bucket, Key=f"{prefix}/{path.name}")["Body"]
        (back / path.name).write_bytes(body.read())
    return time.perf_counter() - start


def _store(store: S3Store, files: list[Path], back: Path) -> float:
    start = time.perf_counter()
    store.put_files([(path, path.name) for path in files])
    store.get_files([(path.name, back / path.name) for path in files])
    return time.perf_counter() - start


def _crt(server: s3server.S3Server, files: list[Path], prefix: str, back: Path) -> Any:
    """The CRT transfer manager (s3transfer.crt), built by hand: boto3's own CRT path
    speaks TLS to AWS endpoints only, not to a plain-HTTP endpoint such as this server."""
    try:
        import awscrt  # noqa: F401
    except ImportError:
        return "skipped: awscrt not installed"
    import botocore.session
    from botocore.config import Config
    from s3transfer.crt import (
        BotocoreCRTCredentialsWrapper,
        BotocoreCRTRequestSerializer,
        CRTTransferManager,
        create_s3_crt_client,
    )

    session = botocore.session.get_session()
    serializer = BotocoreCRTRequestSerializer(
        session,
        {
            "region_name": server.region,
            "endpoint_url": server.endpoint,
            "config": Config(s3={"addressing_style": "path"}),
        },
    )
    credentials = session.get_credentials()
    crt_client = create_s3_crt_client(
        server.region,
        crt_credentials_provider=BotocoreCRTCredentialsWrapper(
            credentials
        ).to_crt_credentials_provider(),
        use_ssl=False,
    )
    start = time.perf_counter()
    with CRTTransferManager(crt_client, serializer) as manager:
        ups = [manager.upload(str(p), server.bucket, f"{prefix}/{p.name}", {}) for p in files]
        for future in ups:
            future.result()
        downs = [
            manager.download(server.bucket, f"{prefix}/{p.name}", str(back / p.name), {})
            for p in files
        ]
        for future in downs:
            future.result()
    return time.perf_counter() - start


def _same(files: list[Path], back: Path) -> None:
    for path in files:
        if (back / path.name).read_bytes() != path.read_bytes():
            raise RuntimeError(f"{path.name} came back different")
        (back / path.name).unlink()


def run() -> dict[str, Any]:
    count = int(os.environ.get("STORE_BENCH_FILES", "12"))
    megabytes = int(os.environ.get("STORE_BENCH_MB", "16"))
    with tempfile.TemporaryDirectory(prefix="store-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        src, back = tmp / "src", tmp / "back"
        src.mkdir()
        back.mkdir()
        files = []
        for i in range(count):
            path = src / f"train-{i:05d}.tfrecord"
            path.write_bytes(os.urandom(megabytes * 1024 * 1024))
            files.append(path)
        moved_mb = 2 * count * megabytes * 1024 * 1024 / 1e6  # up and down
        server = s3server.start(tmp / "s3")
        try:
            with s3server.environment(server.env()):
                run_id = uuid.uuid4().hex[:8]
                plain_s = _plain(server, files, f"bench-{run_id}/plain", back)
                _same(files, back)
                store = S3Store(server.bucket, f"bench-{run_id}/store")
                store_s = _store(store, files, back)
                _same(files, back)
                try:
                    crt = _crt(server, files, f"bench-{run_id}/crt", back)
                except Exception as exc:  # the CRT client against this server: reported
                    crt = f"failed: {type(exc).__name__}: {str(exc)[:160]}"
                if not isinstance(crt, str):
                    _same(files, back)
        finally:
            server.stop()
    figures: dict[str, Any] = {
        "store_bench_files": count,
        "store_bench_file_mb": megabytes,
        "store_plain_mb_per_s": round(moved_mb / plain_s, 1),
        "store_mb_per_s": round(moved_mb / store_s, 1),
        "store_speedup": round(plain_s / store_s, 2),
    }
    if isinstance(crt, str):
        figures["store_crt"] = crt
    else:
        figures["store_crt_mb_per_s"] = round(moved_mb / crt, 1)
    return figures


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
