"""The serving export of a registered version, and `skinlesion serve`, on both stores.

A promoted version carries a committed SavedModel under models/serving/<n>; loaded in a fresh
process with `tf.saved_model.load` and run through `saved_model_cli`, it gives the
probabilities `skinlesion predict` gives for the same files (JPEG, PNG, EXIF-rotated) within
1e-4. `skinlesion serve` answers a real HTTP client on a loopback port with the same figures.
"""

from __future__ import annotations

import base64
import json
import select
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from skinlesion import config, registry
from skinlesion.classes import CLASSES
from skinlesion.evaluate import run_evaluate
from skinlesion.layout import serving_key
from skinlesion.manifest import MANIFEST, OWNER, read_manifest
from skinlesion.predict import predict
from skinlesion.promote import run_promote
from skinlesion.storage import FileStore, Store
from tests.runs import run_env
from tests.test_evaluate import tiny_model, write_model, write_prepared
from tests.test_registry import promote_run
from tests.test_serving_graph import encoded, lesion, oriented

pytestmark = pytest.mark.slow  # TensorFlow
BACKENDS = ["file", pytest.param("s3", marks=pytest.mark.s3)]
TOLERANCE = 1e-4  # the issue's: the SavedModel against `skinlesion predict`
SERVE_START_S = 300  # a hang guard for TF's import on a busy machine, not a speed target


def promoted(store: Store) -> Store:
    """A run (crop resize, a tiny model) evaluated and promoted with its SavedModel;
    returns the champion prefix."""
    run = store.child("runs", "s1")
    prepared, model, evaluation = run.child("prepare"), run.child("train"), run.child("evaluate")
    write_prepared(prepared, resize="crop")
    write_model(model, tiny_model(seed=3), prepared, prepared)
    run_evaluate(config.EvaluateConfig(batch_size=8), model, prepared, evaluation)
    target = store.child("models", "latest")
    decision = run_promote(config.PromoteConfig(), evaluation, model, target, "s1")["decision"]
    assert decision["promoted"] and decision["version"] == 1
    return target


def image_files(tmp: Path) -> list[str]:
    files = {
        "ISIC_0024306.jpg": encoded(lesion(600, 450, 0), quality=90),
        "ISIC_0024307.jpg": encoded(lesion(450, 600, 1), quality=90),
        "lesion.png": encoded(lesion(300, 200, 2), "PNG"),
        "rotated.jpg": oriented(6),
    }
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    return [str(tmp / name) for name in files]


def probabilities(results: list[dict[str, Any]]) -> np.ndarray:
    return np.array([[r["probabilities"][c] for c in CLASSES] for r in results])


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One promoted version on a file store, its images and `skinlesion predict`'s answer."""
    tmp = tmp_path_factory.mktemp("serving")
    store = FileStore(tmp / "store")
    target = promoted(store)
    images = image_files(tmp)
    return {
        "store": store,
        "dir": store.root / "models" / serving_key(1),
        "images": images,
        "expected": probabilities(predict(target.uri, images)),
    }


def test_the_version_carries_a_committed_savedmodel(exported: dict[str, Any]) -> None:
    models = exported["store"].child("models")
    prefix = models.child(serving_key(1))
    manifest = read_manifest(prefix)
    assert manifest is not None and manifest["stage"] == "serving" and manifest["version"] == 1
    keys = set(manifest["files"])
    assert {"saved_model.pb", "variables/variables.index"} <= keys
    assert any(k.startswith("variables/variables.data-") for k in keys)
    assert {o.key for o in prefix.list()} == keys | {MANIFEST, OWNER}
    version = read_manifest(models.child("versions/1"))
    assert version is not None and manifest["model_sha256"] == version["model_sha256"]
    assert manifest["preprocessing"] == {"image_size": 32, "resize": "crop", "jpeg_quality": 95}
    assert manifest["classes"] == list(CLASSES) and manifest["signature"] == "serving_default"
    entry = registry.entry(registry.read_raw(models)[1], 1)
    assert entry["serving"] == serving_key(1)


def test_a_fresh_process_loads_it_and_matches_predict(
    exported: dict[str, Any], tmp_path: Path
) -> None:
    script = (
        "import json, sys, tensorflow as tf\n"
        "m = tf.saved_model.load(sys.argv[1])\n"
        "data = [open(p, 'rb').read() for p in sys.argv[2:]]\n"
        "out = m.signatures['serving_default'](image_bytes=tf.constant(data))\n"
        "print(json.dumps({k: v.numpy().tolist() for k, v in out.items()}, default=bytes.decode))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(exported["dir"]), *exported["images"]],
        capture_output=True,
        text=True,
        env=run_env(),
        timeout=SERVE_START_S,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    expected = exported["expected"]
    np.testing.assert_allclose(np.array(out["probabilities"]), expected, rtol=0, atol=TOLERANCE)
    assert out["classes"] == [list(CLASSES)] * len(expected)
    assert out["predicted"] == [CLASSES[i] for i in expected.argmax(axis=1)]


def test_saved_model_cli_runs_it_and_matches_predict(
    exported: dict[str, Any], tmp_path: Path
) -> None:
    data = np.array([Path(p).read_bytes() for p in exported["images"]], dtype=object)
    np.save(tmp_path / "images.npy", data, allow_pickle=True)
    cli = Path(sys.executable).parent / "saved_model_cli"
    done = subprocess.run(
        [
            str(cli), "run", "--dir", str(exported["dir"]), "--tag_set", "serve",
            "--signature_def", "serving_default",
            "--inputs", f"image_bytes={tmp_path / 'images.npy'}", "--outdir", str(tmp_path / "out"),
        ],
        capture_output=True, text=True, env=run_env(), timeout=SERVE_START_S,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    got = np.load(tmp_path / "out" / "probabilities.npy")
    np.testing.assert_allclose(got, exported["expected"], rtol=0, atol=TOLERANCE)


def test_models_export_copies_the_savedmodel(exported: dict[str, Any], tmp_path: Path) -> None:
    from skinlesion.cli import main

    out = tmp_path / "v1"
    assert main(["models", "export", "1", "--out", str(out), "--store", exported["store"].uri]) == 0
    assert (out / "serving" / "saved_model.pb").read_bytes() == (
        exported["dir"] / "saved_model.pb"
    ).read_bytes()


# --- skinlesion serve: a real server process and a real HTTP client -----------------------


def _call(url: str, body: bytes | None = None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _b64(path: str) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest) -> Store:
    name = "file_store" if request.param == "file" else "s3_store"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


def test_serve_answers_predict_requests_like_predict(store: Store, tmp_path: Path) -> None:
    target = promoted(store)
    images = image_files(tmp_path)
    expected = probabilities(predict(target.uri, images))
    log = tmp_path / "serve.log"  # a file: a full pipe would block the server
    with log.open("w") as stderr:
        server = subprocess.Popen(
            [sys.executable, "-m", "skinlesion", "serve", "--model", store.uri, "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=run_env(),
        )
    try:
        assert server.stdout is not None
        ready, _, _ = select.select([server.stdout], [], [], SERVE_START_S)  # a hang guard
        line = server.stdout.readline() if ready else ""  # "serving … at http://…"
        assert " at http://127.0.0.1:" in line, log.read_text()[-3000:]
        base = line.split(" at ", 1)[1].strip()
        code, status = _call(base)
        assert code == 200 and status["ready"] is True
        assert status["model_version_status"][0]["version"] == "1"

        rows = [{"b64": _b64(p)} for p in images[:2]] + [
            {"image_bytes": {"b64": _b64(p)}} for p in images[2:]
        ]
        code, answer = _call(f"{base}:predict", json.dumps({"instances": rows}).encode())
        assert code == 200, answer
        got = np.array([p["probabilities"] for p in answer["predictions"]])
        np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE)
        assert [p["predicted"] for p in answer["predictions"]] == [
            CLASSES[i] for i in expected.argmax(axis=1)
        ]
        assert answer["predictions"][0]["classes"] == list(CLASSES)
        columnar = {"inputs": {"image_bytes": [{"b64": _b64(images[0])}]}}
        code, answer = _call(f"{base}:predict", json.dumps(columnar).encode())
        assert code == 200 and np.allclose(answer["outputs"]["probabilities"][0], expected[0])

        bad = {
            b"not json": "not JSON",
            b'{"instances": []}': "no instances",
            b'{"instances": [{"b64": "@@"}]}': "instance 0: 'b64' is not valid base64",
            b'{"instances": [{"url": "x"}]}': 'instance 0: expected {"b64"',
            json.dumps({"instances": [rows[0], {"b64": "R0lGODlh"}]}).encode(): (
                "instance 1: the image is not a JPEG or PNG file"
            ),
        }
        for body, message in bad.items():
            code, answer = _call(f"{base}:predict", body)
            assert code == 400 and message in answer["error"], (body, answer)
        assert _call(f"{base.rsplit('/', 1)[0]}/other:predict", b"{}")[0] == 404
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0  # a server's normal end


def test_serve_refuses_what_it_cannot_serve(
    file_store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from skinlesion.cli import main

    cases = [
        (["--model", file_store.uri], "no champion model"),
        (["--model", str(tmp_path / "nothing")], "no champion model"),
        (["--model", "s3://"], "--model"),
        (["--model", file_store.uri, "--port", "70000"], "--port"),
    ]
    for argv, message in cases:
        assert main(["serve", *argv]) == 2
        assert message in capsys.readouterr().err
    promote_run(file_store, "r1", 0.6)  # registered without a SavedModel (opaque model bytes)
    assert main(["serve", "--model", file_store.uri, "--version", "1"]) == 2
    assert "version 1 has no committed serving export" in capsys.readouterr().err
