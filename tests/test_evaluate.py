"""Evaluate stage end to end on a tiny Keras model and val shards; the HTML report.

The helpers here (committed prepare / train / augment prefixes) are shared by
test_promote.py and test_predict.py.
"""

from __future__ import annotations

import csv
import io
import json
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from skinlesion import bootstrap, config, evaluate, report, shards
from skinlesion.classes import CLASSES, NUM_CLASSES
from skinlesion.config import stage_settings
from skinlesion.data_report import index_row, write_index
from skinlesion.errors import InputError
from skinlesion.imaging import ImageStats
from skinlesion.layout import IMAGE_INDEX_FILE
from skinlesion.manifest import commit_stage, input_fingerprints, read_manifest
from skinlesion.metrics import FILE_KEYS, MEL_KEY, compute_metrics
from skinlesion.plots import plt, save
from skinlesion.results import AugmentResult, PrepareResult, TrainResult
from skinlesion.storage import FileStore, Store, get_json
from tests.stage_results import prepare_result, train_result

IMAGE_SIZE = 32


# --- helpers shared with the promote and predict tests --------------------------------------


def png(path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.plot([0, 1], [0, 1])
    ax.set_title(title)
    return save(fig, path)


def lesion_jpeg(rng: np.random.Generator, label: int, size: int, quality: int = 95) -> bytes:
    """A noisy image whose mean colour depends (weakly) on the class."""
    base = np.array([40 + 30 * label, 200 - 20 * label, 90 + 10 * (label % 3)], dtype=float)
    pixels = np.clip(base + rng.normal(0, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_prepared(
    store: Store,
    per_class: tuple[int, ...] = (3, 3, 4, 2, 5, 9, 2),
    image_size: int = IMAGE_SIZE,
    shard_size: int = 7,
    synthetic: bool = True,
    resize: str = "squash",
    seed: int = 0,
    trained_lesions: tuple[str, ...] = (),
) -> list[shards.Example]:
    """Commit a prepare-like prefix holding val shards (several, to test ordering); with
    `trained_lesions`, also its image index, listing one train image of each."""
    rng = np.random.default_rng(seed)
    examples = [
        shards.Example(lesion_jpeg(rng, label, image_size), label, f"ISIC_{i:07d}", f"HAM_{i:07d}")
        for i, label in enumerate(
            int(k) for k in rng.permutation(np.repeat(np.arange(NUM_CLASSES), per_class))
        )
    ]
    cfg = config.PrepareConfig(image_size=image_size, resize=resize, shard_size=shard_size)  # type: ignore[arg-type]

    def body(work: Path) -> PrepareResult:
        with shards.ShardWriter(work, "val", shard_size) as writer:
            for ex in examples:
                writer.write(ex)
        png(work / "class_distribution.png", "classes")
        if trained_lesions:
            stats = ImageStats("0" * 64, 600, 450, 128.0)
            rows = [
                index_row(f"ISIC_train_{i}", lesion, CLASSES[i % NUM_CLASSES], "train", stats)
                for i, lesion in enumerate(trained_lesions)
            ]
            write_index(work / IMAGE_INDEX_FILE, rows)
        counts = {c: per_class[k] for k, c in enumerate(CLASSES)}
        return prepare_result(
            {"val": writer.shards},
            image_size,
            counts={"train": {c: 4 * n for c, n in counts.items()}, "val": counts},
            resize=resize,
            synthetic=synthetic,
        )

    commit_stage("prepare", store, stage_settings("prepare", cfg), {"raw": f"test-{seed}"}, body)
    return examples


def write_augment(store: Store, prepared: Store) -> None:
    def body(work: Path) -> AugmentResult:
        png(work / "class_balance.png", "balance")
        png(work / "augment_samples.png", "samples")
        before = {c: 4 for c in CLASSES}
        return AugmentResult(
            shards={"train": []},
            counts={"before": before, "after": {c: 10 for c in CLASSES}},
            target=10,
            variants=6 * len(CLASSES),
            n_images=10 * len(CLASSES),
            image_size=IMAGE_SIZE,
            synthetic=True,
        )

    cfg = config.AugmentConfig()
    inputs = input_fingerprints({"prepared": prepared.uri})
    sources = {"prepared": prepared.uri}
    commit_stage("augment", store, stage_settings("augment", cfg), inputs, body, input_uris=sources)


def tiny_model(image_size: int = IMAGE_SIZE, seed: int = 0) -> Any:
    """A small CNN on 0-255 input, like the project's models (preprocessing inside)."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(NUM_CLASSES, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def write_model(
    store: Store,
    net: Any,
    train_data: Store,
    val_data: Store,
    stage: str = "train",
    init_model: Store | None = None,
    model_bytes: bytes | None = None,
) -> dict[str, Any]:
    """Commit a train/finetune-like prefix: model.keras (a Keras model or given bytes)."""
    names = {"train_data": train_data.uri, "val_data": val_data.uri}
    if init_model is not None:
        names["init_model"] = init_model.uri

    def body(work: Path) -> TrainResult:
        if model_bytes is not None:
            (work / "model.keras").write_bytes(model_bytes)
        else:
            net.save(work / "model.keras")
        png(work / "training_curves.png", stage)
        return train_result(IMAGE_SIZE, "top" if stage == "train" else "finetune", backbone="tiny")

    settings = stage_settings(stage, config.TrainConfig(backbone="mobilenetv3small"))
    return commit_stage(stage, store, settings, input_fingerprints(names), body, input_uris=names)


def decode_like_training(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float32)


# --- fast tests: report and helpers ---------------------------------------------------------


def _metrics() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, NUM_CLASSES, 60)
    p = rng.dirichlet(np.ones(NUM_CLASSES), 60)
    return compute_metrics(y, p, 10)


class _Tags(HTMLParser):
    """Every real tag of a page with its attributes (escaped text is not a tag)."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.style = ""
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_style = tag == "style"

    def handle_endtag(self, tag: str) -> None:
        self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.style += data


def _assert_self_contained(page: str) -> _Tags:
    """No external resource: every src/href is an embedded PNG, no script, no url()."""
    parser = _Tags()
    parser.feed(page)
    names = {tag for tag, _ in parser.tags}
    assert not names & {"script", "link", "iframe", "object", "embed", "base", "svg"}, names
    for tag, attrs in parser.tags:
        for key in ("src", "href", "srcset", "action", "poster", "data"):
            if key in attrs:
                assert (attrs[key] or "").startswith("data:image/png;base64,"), (tag, attrs)
        assert not any(k.startswith("on") for k in attrs), (tag, attrs)
    assert "url(" not in parser.style and "@import" not in parser.style
    return parser


def test_report_is_self_contained_and_escaped(tmp_path: Path) -> None:
    evil = '<script>alert("x")</script><img src="http://evil.example/x.png">'
    plot = png(tmp_path / "a.png", "a")
    page = report.render(
        report.ReportInputs(
            metrics=_metrics(),
            plots=[("Confusion " + evil, plot)],
            training_plots=[("curves", plot)],
            data_plots=[("classes", plot)],
            data_manifest={
                "synthetic": True,
                "split": evil,
                "lesions_in_both": 3,
                "counts": {"train": {"mel": 5}, "val": {"mel": 2}},
                "skipped": [{"image_id": evil}],
                "settings": {"resize": "crop"},
            },
            model_manifest={"stage": "finetune", "settings": {"backbone": evil}},
            evaluate_settings={"batch_size": 64, "ece_bins": 10},
            sources={"model": "s3://bucket/runs/x/finetune?<b>"},
        )
    )
    tags = _assert_self_contained(page)
    assert "<b>" not in page and "&lt;script&gt;" in page
    assert sum(tag == "img" for tag, _ in tags.tags) == 3
    assert "figures are not medical results" in page
    assert "3 lesions have images in both" in page
    for name in CLASSES:
        assert f"<td>{name}</td>" in page


def test_report_without_synthetic_has_no_banner(tmp_path: Path) -> None:
    page = report.render(
        report.ReportInputs(metrics=_metrics(), data_manifest={"synthetic": False})
    )
    assert "not medical results" not in page
    page = report.render(report.ReportInputs(metrics=_metrics()))
    assert "provenance unknown" in page


def test_report_refuses_non_png(tmp_path: Path) -> None:
    fake = tmp_path / "x.png"
    fake.write_bytes(b"<svg onload=alert(1)>")
    with pytest.raises(ValueError, match="not a PNG"):
        report.png_data_uri(fake)


def test_report_undefined_figures_read_na() -> None:
    metrics = _metrics()
    metrics["roc_auc_macro"] = None
    metrics["melanoma"][MEL_KEY] = None
    page = report.render(report.ReportInputs(metrics=metrics))
    assert page.count("<td class=num>n/a</td>") == 2


# --- the stage end to end (TensorFlow) ------------------------------------------------------


@pytest.fixture
def run_store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "store")


@pytest.mark.slow
def test_evaluate_end_to_end(run_store: FileStore) -> None:
    run = run_store.child("runs", "r1")
    prepared, augmented = run.child("prepare"), run.child("augment")
    examples = write_prepared(prepared)
    write_augment(augmented, prepared)
    net = tiny_model()
    top = run.child("train")
    write_model(top, net, augmented, prepared)
    finetune = run.child("finetune")
    write_model(finetune, net, augmented, prepared, stage="finetune", init_model=top)
    out = run.child("evaluate")
    cfg = config.EvaluateConfig(batch_size=4, ece_bins=10)

    manifest = evaluate.run_evaluate(cfg, finetune, prepared, out)

    for key in (
        "metrics.json",
        "predictions.csv",
        "confusion_matrix.png",
        "roc.png",
        "reliability.png",
        "report.html",
        "manifest.json",
    ):
        assert out.exists(key), key
    assert set(manifest["files"]) == {
        "metrics.json",
        "predictions.csv",
        "confusion_matrix.png",
        "roc.png",
        "reliability.png",
        "report.html",
    }
    metrics = get_json(out, "metrics.json")
    assert tuple(metrics) == FILE_KEYS

    # Independent path: decode the JPEGs we wrote with PIL and run the model directly.
    by_id = {ex.image_id: ex for ex in examples}
    rows = list(csv.DictReader(io.StringIO(out.get_bytes("predictions.csv").decode())))
    assert sorted(r["image_id"] for r in rows) == sorted(by_id)
    pixels = np.stack([decode_like_training(by_id[r["image_id"]].jpeg) for r in rows])
    expected = np.asarray(net.predict(pixels, verbose=0), dtype=np.float64)
    got = np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows])
    np.testing.assert_allclose(got, expected, atol=2e-3)
    y = np.array([CLASSES.index(r["true"]) for r in rows])
    assert all(r["lesion_id"] == by_id[r["image_id"]].lesion_id for r in rows)
    assert [CLASSES.index(r["true"]) for r in rows] == [by_id[r["image_id"]].label for r in rows]
    reference = compute_metrics(y, got, 10)
    assert metrics["confusion_matrix"] == reference["confusion_matrix"]
    assert metrics["balanced_accuracy"] == pytest.approx(reference["balanced_accuracy"])
    assert metrics["n_images"] == len(examples)
    # The intervals resample the lesions of predictions.csv: recomputed from the file.
    lesions = [r["lesion_id"] for r in rows]
    recomputed = bootstrap.intervals(y, got, lesions, seed=evaluate.BOOTSTRAP_SEED)
    assert metrics["intervals"]["n_lesions"] == len(set(lesions))
    assert metrics["intervals"]["balanced_accuracy"] == pytest.approx(
        recomputed["balanced_accuracy"], abs=0.01
    )

    assert manifest["metrics"]["balanced_accuracy"] == metrics["balanced_accuracy"]
    assert manifest["preprocessing"] == {
        "image_size": IMAGE_SIZE,
        "resize": "squash",
        "jpeg_quality": 95,
    }
    assert manifest["synthetic"] is True
    assert manifest["model_sha256"] == read_manifest(finetune)["files"]["model.keras"]["sha256"]  # type: ignore[index]

    page = out.get_bytes("report.html").decode()
    tags = _assert_self_contained(page)
    # 3 own plots + top and finetune curves + class distribution + 2 augment images.
    assert sum(tag == "img" for tag, _ in tags.tags) == 8
    assert "figures are not medical results" in page
    assert "Training curves, phase top" in page and "Augmented training samples" in page
    assert "95% interval" in page and "bootstrap resamples of the" in page

    # Same inputs and settings: skipped, nothing rewritten.
    again = evaluate.run_evaluate(cfg, finetune, prepared, out)
    assert again == manifest
    # Other settings: redone.
    redone = evaluate.run_evaluate(
        config.EvaluateConfig(batch_size=5, ece_bins=10), finetune, prepared, out
    )
    assert redone["fingerprint"] != manifest["fingerprint"]
    # Another batch size changes float summation order: same figures, not the same bits.
    assert _leaves(get_json(out, "metrics.json")) == pytest.approx(_leaves(metrics), abs=1e-9)


def _leaves(tree: Any, path: str = "") -> dict[str, Any]:
    """A nested JSON value as {dotted path: leaf}, for float-tolerant comparisons."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _leaves(sub, f"{path}.{key}").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in _leaves(sub, f"{path}[{i}]").items()}
    return {path: tree}


@pytest.mark.slow
def test_evaluate_refuses_image_size_mismatch(run_store: FileStore) -> None:
    run = run_store.child("runs", "r2")
    prepared = run.child("prepare")
    write_prepared(prepared, image_size=IMAGE_SIZE)
    model = run.child("train")
    write_model(model, tiny_model(image_size=48), prepared, prepared)
    with pytest.raises(InputError, match="expects 48x48"):
        evaluate.run_evaluate(config.EvaluateConfig(), model, prepared, run.child("evaluate"))
    assert read_manifest(run.child("evaluate")) is None


def test_evaluate_needs_committed_inputs(run_store: FileStore) -> None:
    run = run_store.child("runs", "r3")
    with pytest.raises(InputError, match="run its stage first"):
        evaluate.run_evaluate(
            config.EvaluateConfig(), run.child("train"), run.child("prepare"), run.child("evaluate")
        )


def test_metrics_json_is_strict_json(tmp_path: Path) -> None:
    metrics = _metrics()
    metrics["roc_auc_macro"] = None
    text = json.dumps(metrics, allow_nan=False)
    assert json.loads(text)["roc_auc_macro"] is None


@pytest.mark.slow
def test_evaluate_after_the_real_synthetic_prepare_path(run_store: FileStore) -> None:
    from skinlesion.prepare import run_prepare
    from skinlesion.synthetic import write_sample_data

    raw = run_store.child("raw", "HAM10000")
    write_sample_data(raw, images=140, seed=0, workers=1)
    run = run_store.child("runs", "s1")
    prepared = run.child("prepare")
    prep = run_prepare(
        config.PrepareConfig(image_size=IMAGE_SIZE, shard_size=16, workers=1), raw, prepared
    )
    model = run.child("train")
    write_model(model, tiny_model(), prepared, prepared)
    manifest = evaluate.run_evaluate(
        config.EvaluateConfig(), model, prepared, run.child("evaluate")
    )

    metrics = get_json(run.child("evaluate"), "metrics.json")
    assert tuple(metrics) == FILE_KEYS
    assert metrics["n_images"] == sum(prep["counts"]["val"].values())
    assert {c: r["support"] for c, r in metrics["per_class"].items()} == prep["counts"]["val"]
    assert manifest["synthetic"] is True
    page = run.child("evaluate").get_bytes("report.html").decode()
    _assert_self_contained(page)
    assert "figures are not medical results" in page
    assert "Class distribution per split (prepare)" in page
