"""Typed stage results: written with a schema version, read back typed; an old or foreign
manifest is a one-line error naming the file and the field, never a KeyError."""

from __future__ import annotations

from pathlib import Path

import pytest

from skinlesion.errors import InputError
from skinlesion.manifest import MANIFEST, commit_stage, is_done, read_result
from skinlesion.results import SCHEMA_VERSION, PrepareResult, TrainResult
from skinlesion.storage import FileStore, get_json, put_json
from tests.stage_results import prepare_result


@pytest.fixture
def prepared(tmp_path: Path) -> FileStore:
    store = FileStore(tmp_path / "runs" / "r1" / "prepare")
    shards = {"train": [{"file": "train-00000.tfrecord", "count": 3}], "val": []}
    commit_stage("prepare", store, {"s": 1}, {}, lambda work: prepare_result(shards, 32))
    return store


def test_a_result_round_trips_with_its_schema_version(prepared: FileStore) -> None:
    manifest, result = read_result(prepared, PrepareResult, "prepared")
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert result.image_size == 32 and result.n_images == 3
    assert result.preprocessing.resize == "squash"
    assert result.shards["train"][0]["file"] == "train-00000.tfrecord"


def test_a_manifest_without_the_version_is_a_clear_error_and_is_redone(
    prepared: FileStore,
) -> None:
    manifest = get_json(prepared, MANIFEST)
    del manifest["schema_version"]
    put_json(prepared, MANIFEST, manifest)
    with pytest.raises(InputError, match=r"manifest\.json: no schema_version .*rerun that stage"):
        read_result(prepared, PrepareResult, "prepared")
    assert not is_done(prepared, manifest["fingerprint"])  # a rerun rewrites it


def test_a_missing_field_or_another_stage_is_named(prepared: FileStore) -> None:
    manifest = get_json(prepared, MANIFEST)
    del manifest["counts"]
    put_json(prepared, MANIFEST, manifest)
    with pytest.raises(InputError, match="manifest field 'counts' is missing"):
        read_result(prepared, PrepareResult, "prepared")
    with pytest.raises(InputError, match="a 'prepare' output, expected train or finetune"):
        read_result(prepared, TrainResult, "model")
