"""A `file://` store never reads or writes outside its directory: symlinks that lead out
of the tree are refused by name (exit 2), and nothing is written where they point."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from skinlesion import cli
from skinlesion.errors import EXIT_BAD_INPUT, InputError
from skinlesion.storage import FileStore
from skinlesion.synthetic import write_sample_data


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    secret = tmp_path / "outside" / "passwd"
    secret.parent.mkdir()
    secret.write_text("root:x:0:0\n")
    return secret


def test_a_file_symlinked_out_of_the_store_is_listed_but_never_read(
    tmp_path: Path, outside: Path
) -> None:
    store = FileStore(tmp_path / "store")
    store.put_bytes("a/inside.txt", b"ok")
    os.symlink(outside, tmp_path / "store" / "a" / "passwd")
    os.symlink(tmp_path / "store" / "a" / "inside.txt", tmp_path / "store" / "a" / "alias")
    assert [o.key for o in store.list()] == ["a/alias", "a/inside.txt", "a/passwd"]
    assert store.get_bytes("a/alias") == b"ok"  # a link that stays inside is fine
    for read in (store.get_bytes, store.exists, lambda k: store.get_file(k, tmp_path / "x")):
        with pytest.raises(InputError, match=r"a/passwd leads out of the store \(a symlink\)"):
            read("a/passwd")
    with pytest.raises(InputError, match="leads out of the store"):
        store.put_bytes("a/passwd", b"overwritten")
    assert outside.read_text() == "root:x:0:0\n"


def test_a_directory_symlinked_out_of_the_store_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    store = FileStore(tmp_path / "store")
    store.put_bytes("raw/x", b"x")
    os.symlink(elsewhere, tmp_path / "store" / "runs")
    with pytest.raises(InputError, match=r"runs/r1/prepare/out\.bin leads out of the store"):
        store.put_bytes("runs/r1/prepare/out.bin", b"data")
    with pytest.raises(InputError, match="leads out of the store"):
        store.child("runs", "r1")
    with pytest.raises(InputError, match="leads out of the store"):
        store.list("runs")
    assert [o.key for o in store.list()] == ["raw/x"]  # never walks into the link
    assert list(elsewhere.iterdir()) == []


def test_a_run_whose_runs_directory_leads_out_of_the_store_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    store = tmp_path / "store"
    store.mkdir()
    os.symlink(elsewhere, store / "runs")
    code = cli.main(["run", "--store", store.as_uri(), "--preset", "tiny", "--run-id", "r1"])
    assert code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "runs/r1 leads out of the store" in err and "Traceback" not in err
    assert list(elsewhere.iterdir()) == []


def test_an_image_symlinked_out_of_the_raw_tree_is_refused_by_name(
    tmp_path: Path, outside: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = FileStore(tmp_path / "raw")
    write_sample_data(raw, images=70, seed=0, workers=1)
    image = next((tmp_path / "raw" / "HAM10000_images_part_1").iterdir())
    image.unlink()
    os.symlink(outside, image)
    out = tmp_path / "out"
    code = cli.main(["prepare", "--raw", raw.uri, "--out", str(out), "--image-size", "32"])
    assert code == EXIT_BAD_INPUT
    assert f"{image.name} leads out of the store (a symlink): refused" in capsys.readouterr().err
    assert not out.exists()
