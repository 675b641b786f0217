"""`skinlesion models list|show|rollback|export` on both stores: output, store effects,
and one-line errors with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from skinlesion.cli import main
from skinlesion.storage import Store
from tests.test_registry import BACKENDS, promote_run


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest) -> Store:
    name = "file_store" if request.param == "file" else "s3_store"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, (err.strip().splitlines() or [""])[-1]  # the one-line error, after the log


def test_models_commands(store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "models", "list", "--store", store.uri)
    assert (code, out.strip()) == (0, "no model versions")
    _, blob1 = promote_run(store, "r1", 0.60)
    promote_run(store, "r2", 0.70)
    capsys.readouterr()

    code, out, _ = _run(capsys, "models", "list", "--store", store.uri, "--json")
    listed = json.loads(out)
    assert code == 0 and listed["aliases"] == {"champion": 2, "previous": 1}
    assert [(v["version"], v["aliases"], v["run_id"]) for v in listed["versions"]] == [
        (1, ["previous"], "r1"),
        (2, ["champion"], "r2"),
    ]
    code, out, _ = _run(capsys, "models", "list", "--store", store.uri)
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2
    assert "previous" in lines[0] and "r1" in lines[0] and "0.6000" in lines[0]
    assert "champion" in lines[1] and "r2" in lines[1]

    code, out, _ = _run(capsys, "models", "show", "1", "--store", store.uri, "--json")
    shown = json.loads(out)
    assert code == 0 and shown["version"] == 1 and shown["run_id"] == "r1"
    assert set(shown["stages"]) >= {"prepare", "train", "evaluate"}
    assert [h["champion"] for h in shown["history"]] == [1, 2]  # promoted, then replaced
    code, out, _ = _run(capsys, "models", "show", "2", "--store", store.uri)
    assert code == 0 and "r2" in out and "prepare" in out

    code, out, _ = _run(capsys, "models", "rollback", "--store", store.uri)
    assert (code, out.strip()) == (0, "champion: version 1 (was 2)")
    assert store.child("models", "latest").get_bytes("model.keras") == blob1
    code, out, _ = _run(capsys, "models", "rollback", "--to", "2", "--store", store.uri)
    assert (code, out.strip()) == (0, "champion: version 2 (was 1)")
    listed = json.loads(_run(capsys, "models", "list", "--store", store.uri, "--json")[1])
    assert listed["aliases"] == {"champion": 2, "previous": 1}

    dest = tmp_path / "v1"
    code, out, _ = _run(capsys, "models", "export", "1", "--out", str(dest), "--store", store.uri)
    assert code == 0 and (dest / "model.keras").read_bytes() == blob1
    assert json.loads((dest / "manifest.json").read_text())["version"] == 1


def test_models_errors(store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "models", "rollback", "--store", store.uri)
    assert code == 2 and err.startswith("skinlesion models: error: rollback: no previous")
    promote_run(store, "r1", 0.60)
    capsys.readouterr()
    code, _, err = _run(capsys, "models", "show", "7", "--store", store.uri)
    assert code == 2 and err == "skinlesion models: error: N: no model version 7 in the registry"
    code, _, err = _run(capsys, "models", "rollback", "--to", "1", "--store", store.uri)
    assert code == 2 and "already the champion" in err
    code, _, err = _run(
        capsys, "models", "export", "3", "--out", str(tmp_path), "--store", store.uri
    )
    assert code == 2 and "no model version 3" in err
    code, _, err = _run(capsys, "models", "show", "zero", "--store", store.uri)
    assert code == 2 and "skinlesion models" in err
