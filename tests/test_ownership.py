"""A stage deletes only what it can prove it wrote (owner marks), never its inputs.

Every case on the file store and on the real SeaweedFS server: foreign data in the
output prefix, the raw tree, a prefix inside or around an input, the champion and
another stage's output are refused with exit 2 and left byte for byte as they were;
`--force` replaces only the stage's own committed output; a crashed attempt of the
same stage is cleared but keeps its resume state.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import structlog

from skinlesion import cli, config
from skinlesion.errors import InputError
from skinlesion.manifest import (
    MANIFEST,
    OWNER,
    STATE_PREFIX,
    claim,
    commit_stage,
    read_manifest,
    read_owner,
)
from skinlesion.prepare import run_prepare
from skinlesion.promote import publish_champion
from skinlesion.storage import FileStore, Store
from skinlesion.synthetic import write_sample_data

BACKENDS = ["file", pytest.param("s3", marks=pytest.mark.s3)]
CFG = config.PrepareConfig(image_size=32, shard_size=64, workers=1)


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("raw") / "HAM10000"
    write_sample_data(FileStore(path), images=70, seed=1)
    return path


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest) -> Store:
    name = "file_store" if request.param == "file" else "s3_store"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


def _copy_tree(raw_dir: Path, dest: Store) -> Store:
    for path in sorted(p for p in raw_dir.rglob("*") if p.is_file()):
        dest.put_file(path, path.relative_to(raw_dir).as_posix())
    return dest


@pytest.fixture
def raw(raw_dir: Path, store: Store) -> Store:
    return _copy_tree(raw_dir, store.child("raw", "HAM10000"))


def snapshot(store: Store) -> dict[str, bytes]:
    return {o.key: store.get_bytes(o.key) for o in store.list()}


def test_unrelated_files_are_refused_and_kept(raw: Store, store: Store) -> None:
    out = store.child("mine")
    out.put_bytes("thesis.tex", b"years of work")
    out.put_bytes("figures/a.png", b"png")
    before = snapshot(out)
    with pytest.raises(InputError, match=re.escape(f"{out.uri} is not empty and was not written")):
        run_prepare(CFG, raw, out)
    assert snapshot(out) == before


def test_bad_metadata_leaves_the_output_prefix_as_it_was(raw: Store, store: Store) -> None:
    raw.put_bytes("HAM10000_metadata.csv", b"lesion_id,image_id\nHAM_1,ISIC_1\n")
    empty = store.child("fresh")
    with pytest.raises(InputError, match=r"HAM10000_metadata\.csv"):
        run_prepare(CFG, raw, empty)
    assert snapshot(empty) == {}  # not even an owner mark
    foreign = store.child("mine")
    foreign.put_bytes("notes.txt", b"keep me")
    with pytest.raises(InputError):
        run_prepare(CFG, raw, foreign)
    assert snapshot(foreign) == {"notes.txt": b"keep me"}


@pytest.mark.parametrize("where", ["raw", "inside-raw", "around-raw"])
def test_output_overlapping_the_input_is_refused(raw: Store, store: Store, where: str) -> None:
    before = snapshot(store)
    out = {
        "raw": raw,
        "inside-raw": raw.child("prepared"),
        "around-raw": store.child("raw"),
    }[where]
    how = {"raw": "is", "inside-raw": "lies inside", "around-raw": "contains"}[where]
    with pytest.raises(InputError, match=re.escape(f"{out.uri} {how} the raw input")):
        run_prepare(CFG, raw, out)
    assert snapshot(store) == before


def test_champion_and_other_stages_outputs_are_refused(raw: Store, store: Store) -> None:
    prepared = store.child("runs", "r1", "prepare")
    run_prepare(CFG, raw, prepared)
    assert read_owner(prepared)["stage"] == "prepare"  # type: ignore[index]
    champion = store.child("models", "latest")
    claim("champion", champion)
    champion.put_bytes("model.keras", b"the promoted model")
    champion.put_bytes(MANIFEST, b'{"stage": "champion", "fingerprint": "x"}')
    before = snapshot(champion)
    held = re.escape(f"{champion.uri} holds the output of stage 'champion'")
    with pytest.raises(InputError, match=held):
        run_prepare(CFG, raw, champion)
    assert snapshot(champion) == before
    augment_out = store.child("runs", "r1", "augment")
    commit_stage("augment", augment_out, {}, {}, lambda work: {})
    before = snapshot(augment_out)
    with pytest.raises(InputError, match="holds the output of stage 'augment'"):
        run_prepare(CFG, raw, augment_out)
    assert snapshot(augment_out) == before


def test_champion_is_not_published_over_foreign_data(store: Store) -> None:
    model, candidate = store.child("runs", "r1", "train"), store.child("runs", "r1", "evaluate")
    model.put_bytes("model.keras", b"m")
    candidate.put_bytes("metrics.json", b"{}")
    target = store.child("mine")
    target.put_bytes("data.csv", b"a,b")
    with pytest.raises(InputError, match="not empty and was not written by the champion"):
        publish_champion(target, model, candidate, {"stage": "champion", "fingerprint": "f"})
    assert snapshot(target) == {"data.csv": b"a,b"}
    with pytest.raises(InputError, match="lies inside the model input"):
        publish_champion(model.child("x"), model, candidate, {"stage": "champion"})


def test_force_replaces_only_the_stages_own_output(raw: Store, store: Store) -> None:
    out = store.child("runs", "r1", "prepare")
    first = run_prepare(CFG, raw, out)
    again = run_prepare(CFG, raw, out)
    assert again == first  # skipped
    forced = run_prepare(CFG, raw, out, force=True)
    assert forced["fingerprint"] == first["fingerprint"]
    assert forced["created_at"] >= first["created_at"]
    assert read_owner(out)["stage"] == "prepare"  # type: ignore[index]
    assert set(snapshot(out)) == {*forced["files"], MANIFEST, OWNER}


def test_crashed_attempt_is_cleared_but_keeps_its_resume_state(store: Store) -> None:
    """What a SIGKILLed training attempt leaves (its mark, resume state, a partial file);
    tests/test_train.py kills a real training process and resumes from such a prefix."""
    out = store.child("runs", "r1", "train")
    claim("train", out)
    out.put_bytes(f"{STATE_PREFIX}/state.json", b'{"epochs_done": 2}')
    out.put_bytes("history.json", b"partial")
    seen: dict[str, bytes] = {}

    def body(work: Path) -> dict[str, int]:
        seen.update(snapshot(out))
        (work / "model.keras").write_bytes(b"weights")
        return {"epochs_run": 3}

    manifest = commit_stage("train", out, {}, {}, body, claim_first=True)
    assert seen[f"{STATE_PREFIX}/state.json"] == b'{"epochs_done": 2}'
    assert "history.json" not in seen  # partial output cleared, resume state kept
    assert read_manifest(out) == manifest
    assert set(snapshot(out)) == {"model.keras", MANIFEST, OWNER}


@pytest.fixture
def cli_logging() -> object:
    yield
    structlog.reset_defaults()


def test_cli_refusal_is_one_line_exit_2(
    raw_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], cli_logging: object
) -> None:
    raw = shutil.copytree(raw_dir, tmp_path / "HAM10000")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = cli.main(["prepare", "--raw", str(raw), "--out", str(out), "--image-size", "32"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [x for x in err.splitlines() if x.startswith("skinlesion prepare: error:")]
    assert len(lines) == 1 and FileStore(out).uri in lines[0], err
    assert "Traceback" not in err
    assert (out / "keep.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == [
        "keep.txt"
    ]
    code = cli.main(["prepare", "--raw", str(raw), "--out", str(raw), "--image-size", "32"])
    assert code == 2 and "is the raw input" in capsys.readouterr().err
    assert (raw / "HAM10000_metadata.csv").is_file()
