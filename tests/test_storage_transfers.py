"""Data movement: one S3 client per process and settings, many files at once, multipart."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from skinlesion.errors import InputError
from skinlesion.storage import S3Store, Store, open_store, sha256_file
from skinlesion.storage import s3 as s3_backend
from tests import s3server


def test_stores_of_one_process_share_one_client(s3_store: S3Store) -> None:
    other = open_store(s3_store.uri.rsplit("/", 1)[0] + "/elsewhere")
    assert isinstance(other, S3Store)
    assert other._client is s3_store._client
    assert s3_store.child("a", "b")._client is s3_store._client


def test_other_credentials_get_their_own_client(
    s3_server: s3server.S3Server, s3_store: S3Store
) -> None:
    with s3server.environment({"AWS_SECRET_ACCESS_KEY": "not-the-secret"}):
        wrong = open_store(s3_store.uri)
        assert isinstance(wrong, S3Store)
        assert wrong._client is not s3_store._client
        with pytest.raises(InputError, match="access denied"):
            wrong.put_bytes("x", b"refused")
    again = open_store(s3_store.uri)
    assert isinstance(again, S3Store) and again._client is s3_store._client


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.s3)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "file":
        return open_store(str(tmp_path / "store"))
    return request.getfixturevalue("s3_store")  # type: ignore[no-any-return]


def test_many_files_both_ways_with_a_multipart_one(store: Store, tmp_path: Path) -> None:
    sizes = [0, 1, 1000, s3_backend.MULTIPART_BYTES + 12345, 70_000, 5, 3_000_000, 17, 2]
    src = tmp_path / "src"
    src.mkdir()
    paths = []
    for i, size in enumerate(sizes):
        path = src / f"f{i}.bin"
        path.write_bytes(os.urandom(size))
        paths.append(path)
    digests = store.put_files([(p, f"up/{p.name}") for p in paths])
    assert digests == [sha256_file(p) for p in paths]  # in the order given
    back = tmp_path / "back"
    store.get_files([(f"up/{p.name}", back / "deep" / p.name) for p in paths])
    for path in paths:
        assert (back / "deep" / path.name).read_bytes() == path.read_bytes()
    assert [o.key for o in store.list("up")] == sorted(f"up/{p.name}" for p in paths)


def test_a_missing_file_among_many_is_named(store: Store, tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"a")
    store.put_files([(tmp_path / "a", "a")])
    with pytest.raises(InputError, match=r"not found: .*/missing"):
        store.get_files([("a", tmp_path / "got-a"), ("missing", tmp_path / "got-missing")])
