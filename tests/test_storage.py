"""The object store on both backends, against a real SeaweedFS S3 server.

The fault tests put tests/faultproxy.py between the S3Store and SeaweedFS to prove
retries on 5xx / throttling / connection resets / cut-off bodies, and that a
corrupt body is caught (by botocore's CRC or by the store's own sha256) and never
returned.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog
from botocore.retries.standard import ExponentialBackoff

from skinlesion.errors import InputError, StoreError
from skinlesion.storage import (
    FileStore,
    ObjectInfo,
    S3Store,
    Store,
    download_prefix,
    get_json,
    open_store,
    put_json,
    sha256_file,
)
from skinlesion.storage import s3 as s3_backend
from tests.faultproxy import FaultProxy
from tests.s3server import S3Server

BACKENDS = ["file", pytest.param("s3", marks=pytest.mark.s3)]


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest) -> Store:
    """Each test below runs once on a FileStore and once on an S3Store."""
    name = "file_store" if request.param == "file" else "s3_store"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


def _blob(n: int, seed: int = 0) -> bytes:
    """Deterministic, incompressible-looking bytes."""
    out = bytearray()
    block = hashlib.sha256(str(seed).encode()).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:n])


# --- round trips --------------------------------------------------------------------


def test_bytes_round_trip_and_overwrite(store: Store) -> None:
    data = _blob(3000)
    digest = store.put_bytes("a/b/c.bin", data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert store.get_bytes("a/b/c.bin") == data
    store.put_bytes("a/b/c.bin", b"second")
    assert store.get_bytes("a/b/c.bin") == b"second"
    store.put_bytes("empty", b"")
    assert store.get_bytes("empty") == b""


def test_file_round_trip(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(_blob(200_000, seed=1))
    digest = store.put_file(src, "dir/file.bin")
    assert digest == sha256_file(src)
    dest = tmp_path / "out" / "deeper" / "copy.bin"  # parents are created
    store.get_file("dir/file.bin", dest)
    assert dest.read_bytes() == src.read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == ["copy.bin"]  # no temp file left


def test_json_round_trip(store: Store) -> None:
    value = {"b": [1, 2.5, None, True], "a": {"nested": "é"}, "n": 0}
    put_json(store, "x/value.json", value)
    assert get_json(store, "x/value.json") == value
    store.put_bytes("x/bad.json", b"{not json")
    with pytest.raises(InputError, match=r"x/bad\.json: invalid JSON"):
        get_json(store, "x/bad.json")


def test_list_has_directory_semantics(store: Store) -> None:
    for key, size in [("a/1", 1), ("a/2", 2), ("a/b/3", 3), ("ab/4", 4), ("c", 5)]:
        store.put_bytes(key, b"x" * size)
    assert store.list() == [
        ObjectInfo("a/1", 1),
        ObjectInfo("a/2", 2),
        ObjectInfo("a/b/3", 3),
        ObjectInfo("ab/4", 4),
        ObjectInfo("c", 5),
    ]
    assert [o.key for o in store.list("a")] == ["a/1", "a/2", "a/b/3"]  # not ab/4
    assert [o.key for o in store.list("a/b")] == ["a/b/3"]
    assert store.list("missing") == []
    assert store.list("c") == []  # an object is not a prefix, on both backends


def test_exists_and_delete(store: Store) -> None:
    assert not store.exists("k/v")
    store.put_bytes("k/v", b"1")
    assert store.exists("k/v")
    assert not store.exists("k")  # a "directory" is not an object
    store.delete("k/v")
    assert not store.exists("k/v")
    assert store.list() == []
    store.delete("k/v")  # deleting a missing object is not an error


def test_child_stores(store: Store) -> None:
    child = store.child("runs", "r1/")
    assert child.uri == f"{store.uri}/runs/r1"
    child.put_bytes("prepare/manifest.json", b"{}")
    assert store.exists("runs/r1/prepare/manifest.json")
    grandchild = child.child("prepare")
    assert grandchild.uri == f"{store.uri}/runs/r1/prepare"
    assert [o.key for o in grandchild.list()] == ["manifest.json"]
    assert [o.key for o in child.list()] == ["prepare/manifest.json"]
    assert open_store(grandchild.uri).get_bytes("manifest.json") == b"{}"  # uri round trip


def test_download_prefix(store: Store, tmp_path: Path) -> None:
    store.put_bytes("model/a.bin", b"A")
    store.put_bytes("model/sub/b.bin", b"BB")
    store.put_bytes("modelx/no.bin", b"no")
    paths = download_prefix(store, "model", tmp_path / "dl")
    assert sorted(p.relative_to(tmp_path / "dl").as_posix() for p in paths) == [
        "a.bin",
        "sub/b.bin",
    ]
    assert (tmp_path / "dl" / "sub" / "b.bin").read_bytes() == b"BB"


# --- errors -------------------------------------------------------------------------


def test_missing_key_is_input_error_naming_the_uri(store: Store, tmp_path: Path) -> None:
    where = f"{store.uri}/no/such.bin"
    with pytest.raises(InputError, match="not found") as info:
        store.get_bytes("no/such.bin")
    assert where in str(info.value)
    with pytest.raises(InputError) as info:
        store.get_file("no/such.bin", tmp_path / "dest.bin")
    assert where in str(info.value)
    assert not (tmp_path / "dest.bin").exists()
    with pytest.raises(InputError, match="not found"):
        get_json(store, "no/such.bin")


UNSAFE_KEYS = [
    "../escape",
    "a/../../escape",
    "..",
    "/etc/passwd",
    "a\\b",
    "a//b",
    "a/",
    "",
    "a b",
    "a/./b",
    ".hidden",
    "-dash",
    "semi;colon",
    "quote'",
    "percent%2e%2e",
    "tilde~",
    "naïve",
    "new\nline",
    "trailing\n",
    "nul\x00",
    "x" * 201,
]
OPERATIONS: dict[str, Callable[[Store, str], Any]] = {
    "put_bytes": lambda s, k: s.put_bytes(k, b"data"),
    "get_bytes": lambda s, k: s.get_bytes(k),
    "exists": lambda s, k: s.exists(k),
    "delete": lambda s, k: s.delete(k),
    "list": lambda s, k: s.list(k),
    "child": lambda s, k: s.child(k),
}


@pytest.mark.parametrize("key", UNSAFE_KEYS, ids=repr)
def test_unsafe_keys_refused(file_store: FileStore, key: str, tmp_path: Path) -> None:
    for name, op in OPERATIONS.items():
        if name in ("list", "child") and key in ("", "a/"):
            continue  # "" and "a/" mean "the whole store" / "a" for these two
        with pytest.raises(InputError, match="unsafe"):
            op(file_store, key)
    with pytest.raises(InputError, match="unsafe"):
        file_store.put_file(__file__, key)
    with pytest.raises(InputError, match="unsafe"):
        file_store.get_file(key, tmp_path / "dest")
    # nothing was written anywhere, inside or outside the store
    assert not (tmp_path / "escape").exists()
    assert file_store.list() == []


@pytest.mark.s3
@pytest.mark.parametrize("key", ["../escape", "/abs", "a\\b", "a b", "trailing\n"], ids=repr)
def test_unsafe_keys_refused_on_s3(s3_store: S3Store, s3_server: S3Server, key: str) -> None:
    for op in OPERATIONS.values():
        with pytest.raises(InputError, match="unsafe"):
            op(s3_store, key)
    listed = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix="t/")
    assert not any("escape" in o["Key"] or "abs" in o["Key"] for o in listed.get("Contents", []))


def test_child_refuses_escapes(store: Store) -> None:
    for parts in [("..",), ("a", ".."), ("/etc",), ("a", "/etc"), ("a/../..",), ()]:
        with pytest.raises(InputError):
            store.child(*parts)


def test_file_store_leaves_no_temp_files(file_store: FileStore, tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"abc")
    file_store.put_bytes("d/x", b"1")
    file_store.put_file(src, "d/y")
    names = sorted(p.name for p in (file_store.root / "d").iterdir())
    assert names == ["x", "y"]
    (file_store.root / "d" / ".tmp-half").write_bytes(b"partial")  # a crashed writer
    assert [o.key for o in file_store.list()] == ["d/x", "d/y"]


# --- open_store ---------------------------------------------------------------------


def test_open_store_file_uris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = open_store(f"file://{tmp_path}/a")
    assert isinstance(s, FileStore) and s.root == tmp_path / "a"
    assert s.uri == (tmp_path / "a").as_uri()
    s = open_store(f"file://localhost{tmp_path}/b")
    assert isinstance(s, FileStore) and s.root == tmp_path / "b"
    monkeypatch.chdir(tmp_path)
    s = open_store("rel/dir")
    assert isinstance(s, FileStore) and s.root == tmp_path / "rel" / "dir"
    assert open_store(s.uri).root == s.root  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["dir with space", "caf\u00e9", "100%", "a%20b", "x#y?z;w"])
def test_file_store_uri_round_trips_through_open_store(tmp_path: Path, name: str) -> None:
    root = tmp_path / name / "store"
    store = FileStore(root)
    assert store.root == root
    assert " " not in store.uri and store.uri.isascii()  # encoded once, printable
    again = open_store(store.uri)
    assert isinstance(again, FileStore) and again.root == root and again.uri == store.uri
    store.put_bytes("runs/x/a.json", b"{}")
    child = open_store(store.child("runs", "x").uri)
    assert isinstance(child, FileStore) and child.root == root / "runs" / "x"
    assert child.get_bytes("a.json") == b"{}"
    assert (root / "runs" / "x" / "a.json").is_file()  # no directory named "%20" etc.
    assert open_store(str(root)).uri == store.uri  # a plain path is never decoded


def test_file_uri_written_by_hand_is_decoded_once(tmp_path: Path) -> None:
    root = tmp_path / "dir with space \u00e9"
    assert open_store(f"file://{root}").root == root  # type: ignore[attr-defined]
    encoded = f"file://{tmp_path}/dir%20with%20space%20%C3%A9"
    assert open_store(encoded).root == root  # type: ignore[attr-defined]
    assert open_store(f"file://{tmp_path}/with%2520space").root == tmp_path / "with%20space"  # type: ignore[attr-defined]


def test_file_store_on_an_existing_file_is_input_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="is a file, not a directory"):
        open_store(str(tmp_path / "f"))


def test_open_store_s3_uris() -> None:
    s = open_store("s3://my-bucket/some/prefix/")
    assert isinstance(s, S3Store)
    assert (s.bucket, s.prefix, s.uri) == ("my-bucket", "some/prefix", "s3://my-bucket/some/prefix")
    s = open_store("s3://my-bucket")
    assert isinstance(s, S3Store)
    assert (s.bucket, s.prefix, s.uri) == ("my-bucket", "", "s3://my-bucket")


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("", "empty store URI"),
        ("ftp://host/x", "unsupported store URI scheme 'ftp'"),
        ("http://host/x", "unsupported store URI scheme 'http'"),
        ("file://otherhost/x", "file:///absolute/path"),
        ("file:///tmp/a#b", "percent-encode"),
        ("file:///tmp/a?b", "percent-encode"),
        ("s3://", "needs a bucket"),
        ("s3:///prefix", "needs a bucket"),
        ("s3://Bad_Bucket/x", "invalid S3 bucket name"),
        ("s3://user:secret@bucket/x", "invalid S3 bucket name"),
        ("s3://bucket/../x", "unsafe"),
        ("s3://bucket/a b", "unsafe"),
        ("s3://bucket/x?versionId=1", "s3://bucket/prefix"),
        ("s3://bucket/x#frag", "s3://bucket/prefix"),
    ],
)
def test_open_store_refuses_bad_uris(uri: str, message: str) -> None:
    with pytest.raises(InputError, match="^.*" + message.replace("?", r"\?")):
        open_store(uri)


# --- S3 specifics: integrity metadata, credentials ------------------------------------


@pytest.mark.s3
def test_s3_writes_sha256_metadata(s3_store: S3Store, s3_server: S3Server, tmp_path: Path) -> None:
    raw = s3_server.client()
    data = _blob(5000, seed=2)
    s3_store.put_bytes("m/bytes.bin", data)
    src = tmp_path / "f.bin"
    src.write_bytes(_blob(7000, seed=3))
    s3_store.put_file(src, "m/file.bin")
    head = raw.head_object(Bucket=s3_server.bucket, Key=f"{s3_store.prefix}/m/bytes.bin")
    assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
    head = raw.head_object(Bucket=s3_server.bucket, Key=f"{s3_store.prefix}/m/file.bin")
    assert head["Metadata"]["sha256"] == sha256_file(src)


@pytest.fixture
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shorten the waits, not the number of attempts (botocore's and ours)."""
    monkeypatch.setattr(s3_backend, "RETRY_BASE_S", 0.001)
    monkeypatch.setitem(ExponentialBackoff._DEFAULT_BACKOFF_CONFIG, "throttling_base_scale", 0.01)


@pytest.mark.s3
def test_s3_sha256_mismatch_is_caught(
    s3_store: S3Store, s3_server: S3Server, tmp_path: Path, fast_backoff: None
) -> None:
    """An object whose bytes do not match its sha256 metadata is never returned."""
    raw = s3_server.client()
    bad = hashlib.sha256(b"something else").hexdigest()
    raw.put_object(
        Bucket=s3_server.bucket,
        Key=f"{s3_store.prefix}/bad.bin",
        Body=b"payload",
        Metadata={"sha256": bad},
    )
    with pytest.raises(StoreError, match="sha256 checksum mismatch"):
        s3_store.get_bytes("bad.bin")
    dest = tmp_path / "dest.bin"
    with pytest.raises(StoreError, match="sha256 checksum mismatch"):
        s3_store.get_file("bad.bin", dest)
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temp file
    # Objects written by other tools (no sha256 metadata) are accepted as they are.
    raw.put_object(Bucket=s3_server.bucket, Key=f"{s3_store.prefix}/plain.bin", Body=b"plain")
    assert s3_store.get_bytes("plain.bin") == b"plain"


@pytest.mark.s3
@pytest.mark.parametrize(
    ("env", "code"),
    [
        ({"AWS_SECRET_ACCESS_KEY": "wrong-secret"}, "SignatureDoesNotMatch|403"),
        ({"AWS_ACCESS_KEY_ID": "nobody", "AWS_SECRET_ACCESS_KEY": "x"}, "InvalidAccessKeyId|403"),
    ],
)
def test_s3_wrong_credentials_are_access_denied(
    s3_uri: str, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], code: str
) -> None:
    good = open_store(s3_uri)
    good.put_bytes("secret.txt", b"s")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    bad = open_store(s3_uri)
    for op in (
        lambda: bad.get_bytes("secret.txt"),
        lambda: bad.exists("secret.txt"),
        lambda: bad.put_bytes("new.txt", b"n"),
        lambda: bad.list(),
    ):
        with pytest.raises(InputError, match=rf"access denied \(({code})\)"):
            op()
    assert not good.exists("new.txt")


@pytest.mark.s3
def test_s3_missing_bucket_is_input_error(s3_server: S3Server) -> None:
    store = open_store("s3://no-such-bucket-here/x")
    with pytest.raises(InputError, match="no-such-bucket-here"):
        store.get_bytes("k")


# --- injected faults (tests/faultproxy.py) ---------------------------------------------


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint, lifetime=120) as p:
        yield p


@pytest.fixture
def via_proxy(s3_store: S3Store, proxy: FaultProxy, fast_backoff: None) -> S3Store:
    """The test's S3 prefix, reached through the fault proxy by the store's own client."""
    return S3Store(s3_store.bucket, s3_store.prefix, s3_backend._s3_client(endpoint=proxy.url))


def _outcomes(proxy: FaultProxy, method: str | None = None) -> list[str]:
    return [r.outcome for r in proxy.requests if method is None or r.method == method]


def _transfer_retries(logs: list[MutableMapping[str, Any]]) -> list[str]:
    return [e["problem"] for e in logs if e["event"] == "transfer_retry"]


TRANSIENT = {
    "503-slowdown": lambda p: p.fail(3, 503, "SlowDown"),
    "500-internal": lambda p: p.fail(2, 500, "InternalError"),
    "reset": lambda p: p.reset(2),
}
OPS: dict[str, Callable[[S3Store, Path], Any]] = {
    "put_bytes": lambda s, d: s.put_bytes("new.bin", b"fresh"),
    "put_file": lambda s, d: s.put_file(d / "src.bin", "new.bin"),
    "get_bytes": lambda s, d: s.get_bytes("obj.bin"),
    "get_file": lambda s, d: s.get_file("obj.bin", d / "got.bin"),
    "exists": lambda s, d: s.exists("obj.bin"),
    "list": lambda s, d: s.list(),
    "delete": lambda s, d: s.delete("obj.bin"),
}


@pytest.mark.s3
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("fault", list(TRANSIENT))
def test_s3_retries_transient_failures(
    via_proxy: S3Store, proxy: FaultProxy, tmp_path: Path, fault: str, op: str
) -> None:
    data = _blob(50_000, seed=4)
    via_proxy.put_bytes("obj.bin", data)
    (tmp_path / "src.bin").write_bytes(b"fresh")
    before = len(proxy.requests)
    TRANSIENT[fault](proxy)
    result = OPS[op](via_proxy, tmp_path)
    assert proxy.pending == 0, "every injected fault hit a request"
    seen = _outcomes(proxy)[before:]
    assert seen[-1] == "forwarded" and len(seen) > 1
    # and the operation really happened, correctly
    if op == "get_bytes":
        assert result == data
    elif op == "get_file":
        assert (tmp_path / "got.bin").read_bytes() == data
    elif op == "exists":
        assert result is True
    elif op == "list":
        assert [o.key for o in result] == ["obj.bin"]
    elif op == "delete":
        assert not via_proxy.exists("obj.bin")
    else:
        assert via_proxy.get_bytes("new.bin") == b"fresh"


@pytest.mark.s3
@pytest.mark.parametrize(
    "fault",
    [
        lambda p: p.fail(1000, 500, "InternalError"),
        lambda p: p.fail(1000, 503, "SlowDown"),
        lambda p: p.reset(1000),
    ],
    ids=["500", "503", "reset"],
)
def test_s3_permanent_failure_is_store_error_after_retries(
    via_proxy: S3Store, proxy: FaultProxy, fault: Callable[[FaultProxy], Any]
) -> None:
    fault(proxy)
    for op in (lambda: via_proxy.get_bytes("x"), lambda: via_proxy.put_bytes("x", b"1")):
        before = len(proxy.requests)
        with pytest.raises(StoreError) as info:
            op()
        assert not isinstance(info.value, InputError)  # transient: the stage may retry
        assert len(proxy.requests) - before == s3_backend.ATTEMPTS  # botocore's attempts


@pytest.mark.s3
def test_s3_cut_off_body_is_read_again(
    via_proxy: S3Store, proxy: FaultProxy, tmp_path: Path
) -> None:
    data = _blob(300_000, seed=5)
    via_proxy.put_bytes("big.bin", data)
    proxy.truncate(2)
    with structlog.testing.capture_logs() as logs:
        assert via_proxy.get_bytes("big.bin") == data
    assert _outcomes(proxy, "GET") == ["truncate", "truncate", "forwarded"]
    assert len(_transfer_retries(logs)) == 2  # our retry loop, not botocore's
    proxy.truncate(2)
    via_proxy.get_file("big.bin", tmp_path / "big.bin")  # s3transfer re-reads the stream
    assert (tmp_path / "big.bin").read_bytes() == data
    assert _outcomes(proxy, "GET")[3:] == ["truncate", "truncate", "forwarded"]


@pytest.mark.s3
@pytest.mark.parametrize("strip", [False, True], ids=["botocore-crc", "our-sha256"])
def test_s3_corrupt_body_is_detected_and_read_again(
    via_proxy: S3Store, proxy: FaultProxy, tmp_path: Path, strip: bool
) -> None:
    """With the CRC header botocore notices; without it, only our sha256 metadata can."""
    data = _blob(100_000, seed=6)
    via_proxy.put_bytes("obj.bin", data)
    expected_problem = "sha256 checksum mismatch" if strip else "FlexibleChecksumError"

    def read_file() -> bytes:
        via_proxy.get_file("obj.bin", tmp_path / "o.bin")
        return (tmp_path / "o.bin").read_bytes()

    for read in (lambda: via_proxy.get_bytes("obj.bin"), read_file):
        proxy.corrupt(2, strip_checksums=strip)
        before = len(_outcomes(proxy, "GET"))
        with structlog.testing.capture_logs() as logs:
            assert read() == data
        assert _outcomes(proxy, "GET")[before:] == ["corrupt", "corrupt", "forwarded"]
        problems = _transfer_retries(logs)
        assert len(problems) == 2 and all(expected_problem in p for p in problems), problems


@pytest.mark.s3
@pytest.mark.parametrize("strip", [False, True], ids=["botocore-crc", "our-sha256"])
def test_s3_permanently_corrupt_body_is_never_returned(
    via_proxy: S3Store, proxy: FaultProxy, tmp_path: Path, strip: bool
) -> None:
    via_proxy.put_bytes("obj.bin", _blob(10_000, seed=7))
    proxy.corrupt(1000, strip_checksums=strip)
    with pytest.raises(StoreError, match=f"after {s3_backend.ATTEMPTS} attempts"):
        via_proxy.get_bytes("obj.bin")
    dest = tmp_path / "dl" / "obj.bin"
    with pytest.raises(StoreError, match=f"after {s3_backend.ATTEMPTS} attempts"):
        via_proxy.get_file("obj.bin", dest)
    assert os.listdir(dest.parent) == []  # no file, no temp file
    assert _outcomes(proxy, "GET").count("corrupt") == 2 * s3_backend.ATTEMPTS
