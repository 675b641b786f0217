"""`predict` on real-sized 600x450 JPEG (and PNG) input, from every kind of model URI."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from skinlesion import config
from skinlesion.classes import CLASSES
from skinlesion.errors import DataError, InputError
from skinlesion.evaluate import run_evaluate
from skinlesion.imaging import resize_jpeg
from skinlesion.predict import predict, resolve_model
from skinlesion.promote import run_promote
from skinlesion.storage import FileStore
from tests.test_evaluate import IMAGE_SIZE, tiny_model, write_model, write_prepared

pytestmark = pytest.mark.slow  # TensorFlow / Keras


def ham_jpeg(path: Path, seed: int = 0) -> Path:
    """A 600x450 RGB JPEG like the HAM10000 files: a dark blob left of centre."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:450, 0:600]
    blob = ((xx - 200) ** 2 + (yy - 225) ** 2) < 120**2
    pixels = np.where(blob[..., None], [90, 50, 40], [210, 170, 150]).astype(float)
    pixels += rng.normal(0, 12, pixels.shape)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
    return path


def _expected(net: Any, path: Path, resize: str) -> np.ndarray:
    """Independent path: prepare's resize, then a PIL decode, then the model."""
    jpeg = resize_jpeg(path.read_bytes(), path.name, IMAGE_SIZE, resize, 95)  # type: ignore[arg-type]
    pixels = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float32)
    return np.asarray(net.predict(pixels[None], verbose=0)[0], dtype=np.float64)


@pytest.fixture
def lineage(tmp_path: Path) -> dict[str, Any]:
    """A run whose prepare used `crop`, its model, evaluation and the champion."""
    store = FileStore(tmp_path / "store")
    run = store.child("runs", "p1")
    prepared = run.child("prepare")
    write_prepared(prepared, resize="crop")
    net = tiny_model(seed=3)
    model = run.child("train")
    write_model(model, net, prepared, prepared)
    evaluation = run.child("evaluate")
    run_evaluate(config.EvaluateConfig(batch_size=8), model, prepared, evaluation)
    target = store.child("models", "latest")
    run_promote(config.PromoteConfig(), evaluation, model, target, "p1")
    images = [
        ham_jpeg(tmp_path / "ISIC_0024306.jpg", 0),
        ham_jpeg(tmp_path / "ISIC_0024307.jpg", 1),
    ]
    return {"store": store, "net": net, "model": model, "target": target, "images": images}


def _check(results: list[dict[str, Any]], images: list[Path]) -> None:
    assert [r["image"] for r in results] == [str(p) for p in images]
    for r in results:
        probs = r["probabilities"]
        assert list(probs) == list(CLASSES)
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
        assert all(0.0 <= p <= 1.0 for p in probs.values())
        assert r["predicted"] == max(probs, key=probs.__getitem__)


def test_predict_from_champion_uses_the_lineage_resize(lineage: dict[str, Any]) -> None:
    images = lineage["images"]
    results = predict(lineage["target"].uri, [str(p) for p in images])
    _check(results, images)
    for r, path in zip(results, images, strict=True):
        got = np.array([r["probabilities"][c] for c in CLASSES])
        crop = _expected(lineage["net"], path, "crop")
        squash = _expected(lineage["net"], path, "squash")
        np.testing.assert_allclose(got, crop, atol=1e-3)
        # The two modes give visibly different inputs here (the blob is off centre).
        assert not np.allclose(crop, squash, atol=1e-4)


def test_predict_from_train_prefix_and_keras_file(lineage: dict[str, Any]) -> None:
    images = [str(p) for p in lineage["images"]]
    from_champion = predict(lineage["target"].uri, images)
    # A train prefix: the resize mode comes from the sibling prepare it was trained on.
    from_stage = predict(lineage["model"].uri, images)
    # A direct .keras file in the same prefix, as a URI and as a plain path.
    from_file = predict(lineage["model"].uri + "/model.keras", images)
    plain = predict(str(lineage["model"].root / "model.keras"), images)
    for other in (from_stage, from_file, plain):
        for a, b in zip(from_champion, other, strict=True):
            assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-6)


def test_predict_png_and_unknown_lineage(tmp_path: Path) -> None:
    net = tiny_model(seed=1)
    net.save(tmp_path / "m.keras")  # no manifest next to it: squash, with a warning
    png = tmp_path / "lesion.png"
    Image.open(ham_jpeg(tmp_path / "a.jpg")).convert("RGBA").save(png)
    results = predict(str(tmp_path / "m.keras"), [str(png)])
    _check(results, [png])


def test_bad_images_are_named(lineage: dict[str, Any], tmp_path: Path) -> None:
    broken = tmp_path / "ISIC_broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = str(lineage["images"][0])
    with pytest.raises(DataError, match=r"ISIC_broken\.jpg"):
        predict(lineage["target"].uri, [good, str(broken)])
    with pytest.raises(DataError, match=r"ISIC_missing\.jpg"):
        predict(lineage["target"].uri, [str(tmp_path / "ISIC_missing.jpg")])


def test_missing_model_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no model"):
        predict(FileStore(tmp_path / "empty").uri, [str(ham_jpeg(tmp_path / "a.jpg"))])
    store, key = resolve_model("s3://bucket/models/latest/model.keras")
    assert store.uri == "s3://bucket/models/latest" and key == "model.keras"


def test_predict_cli_prints_json_and_exits_2_on_bad_image(
    lineage: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from skinlesion import cli

    image = str(lineage["images"][0])
    assert cli.main(["predict", "--model", lineage["target"].uri, image]) == 0
    results = json.loads(capsys.readouterr().out)
    _check(results, [lineage["images"][0]])
    broken = tmp_path / "ISIC_bad.jpg"
    broken.write_bytes(b"nope")
    assert cli.main(["predict", "--model", lineage["target"].uri, str(broken)]) == 2
    assert "ISIC_bad.jpg" in capsys.readouterr().err
