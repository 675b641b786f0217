"""Synthetic HAM10000 trees: the real layout and statistics, class-dependent images."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skinlesion import ham10000, logs, synthetic
from skinlesion.classes import CLASSES
from skinlesion.errors import InputError
from skinlesion.storage import FileStore


def test_full_size_plan_has_the_real_statistics() -> None:
    specs = synthetic.plan(10015, seed=3)
    per_class = Counter(s.lesion.dx for s in specs)
    assert dict(per_class) == synthetic.REAL_IMAGES_PER_CLASS
    lesions = Counter(s.lesion.lesion_id for s in specs)
    sizes = Counter(lesions.values())
    real = synthetic.REAL_LESION_SIZES
    assert abs(len(lesions) - sum(real.values())) / sum(real.values()) < 0.03
    assert abs(sizes[1] / len(lesions) - real[1] / sum(real.values())) < 0.03
    assert max(sizes) <= 6
    ids = [int(s.image_id[5:]) for s in specs]
    assert len(set(ids)) == 10015
    assert min(ids) >= 24306 and max(ids) <= 34320  # the real id range
    part_1 = [s for s in specs if s.key.startswith("HAM10000_images_part_1/")]
    assert all(int(s.image_id[5:]) <= 29305 for s in part_1)
    assert 4700 < len(part_1) < 5300  # about 5,000 like the real part 1


def test_small_plan_has_two_lesions_per_class_and_one_dx_per_lesion() -> None:
    specs = synthetic.plan(70, seed=0)
    assert len(specs) == 70
    for name in CLASSES:
        assert len({s.lesion.lesion_id for s in specs if s.lesion.dx == name}) >= 2
    dx_of: dict[str, set[str]] = {}
    for s in specs:
        dx_of.setdefault(s.lesion.lesion_id, set()).add(s.lesion.dx)
    assert all(len(v) == 1 for v in dx_of.values())
    with pytest.raises(InputError, match=">= 70"):
        synthetic.plan(69, seed=0)


def test_metadata_is_valid_in_the_real_column_order() -> None:
    data = synthetic.metadata_csv(synthetic.plan(500, seed=1))
    assert data.decode().splitlines()[0] == "lesion_id,image_id,dx,dx_type,age,sex,localization"
    frame = ham10000.parse_metadata(data)
    assert len(frame) == 500
    assert set(frame["sex"]) <= {"male", "female", "unknown"}
    assert set(frame["localization"]) <= set(synthetic.LOCALIZATIONS)
    assert set(frame["dx_type"]) <= {"histo", "follow_up", "consensus", "confocal"}
    ages = frame["age"].dropna()
    assert ages.between(0, 85).all() and (ages % 5 == 0).all()
    # The same lesion keeps its age, sex and site across its images.
    assert (
        (frame.groupby("lesion_id")[["age", "sex", "localization"]].nunique(dropna=False) <= 1)
        .all()
        .all()
    )


def test_plan_is_deterministic_per_seed() -> None:
    assert synthetic.metadata_csv(synthetic.plan(200, 5)) == synthetic.metadata_csv(
        synthetic.plan(200, 5)
    )
    assert synthetic.metadata_csv(synthetic.plan(200, 5)) != synthetic.metadata_csv(
        synthetic.plan(200, 6)
    )


def test_render_is_a_deterministic_600x450_rgb_jpeg() -> None:
    spec = synthetic.plan(100, seed=2)[0]
    data = synthetic.render(spec)
    assert data == synthetic.render(spec)
    img = Image.open(io.BytesIO(data))
    assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (600, 450))


def test_files_weigh_about_what_real_ham10000_files_weigh() -> None:
    """Real 600x450 HAM10000 JPEGs average about 260 KB; decode time follows size, so the
    benchmarks' files must be as heavy (within 20%), every class alike."""
    specs = synthetic.plan(400, seed=5)
    chosen = [s for name in CLASSES for s in [x for x in specs if x.lesion.dx == name][:3]]
    sizes = [len(synthetic.render(s)) for s in chosen]
    assert abs(np.mean(sizes) / 260_000 - 1) < 0.2, np.mean(sizes)
    assert min(sizes) > 150_000, sizes


def test_images_of_one_lesion_differ_but_look_alike() -> None:
    specs = synthetic.plan(300, seed=4)
    lesion = Counter(s.lesion.lesion_id for s in specs).most_common(1)[0][0]
    a, b = [s for s in specs if s.lesion.lesion_id == lesion][:2]
    assert synthetic.render(a) != synthetic.render(b)
    assert synthetic.lesion_look(
        a.lesion.dx, np.random.default_rng([a.seed, 1, a.lesion.index])
    ).keys() == synthetic.ARCHETYPES[a.lesion.dx].keys() | {"aspect"}


def _mean_colours(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    specs = synthetic.plan(2000, seed)
    features, labels = [], []
    for label, name in enumerate(CLASSES):
        chosen = [s for s in specs if s.lesion.dx == name][:per_class]
        for spec in chosen:
            img = np.asarray(Image.open(io.BytesIO(synthetic.render(spec))).reduce(4), np.float32)
            centre = img[20:-20, 25:-25]
            features.append([*img.mean((0, 1)), *centre.mean((0, 1)), *centre.std((0, 1))])
            labels.append(label)
    return np.array(features), np.array(labels)


@pytest.mark.slow
def test_classes_differ_but_simple_colour_statistics_do_not_separate_them() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.preprocessing import StandardScaler

    x_train, y_train = _mean_colours(14, seed=10)
    x_test, y_test = _mean_colours(14, seed=11)
    scaler = StandardScaler().fit(x_train)
    model = LogisticRegression(max_iter=2000).fit(scaler.transform(x_train), y_train)
    score = balanced_accuracy_score(y_test, model.predict(scaler.transform(x_test)))
    assert score > 0.3  # class-dependent: well above chance (1/7)
    assert score < 0.9  # but colour statistics alone do not give the label away


def test_write_sample_data_writes_a_valid_tree(tmp_path: Path, capsys) -> None:
    logs.configure(run_id="r1", stage="run")  # capsys' stderr is no TTY: JSON lines
    store = FileStore(tmp_path / "raw")
    summary = synthetic.write_sample_data(store, images=70, seed=0, workers=1)
    assert summary["images"] == 70 and summary["synthetic"] is True
    events = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    (last,) = [e for e in events if e["event"] == "progress" and e["finished"]]
    assert (last["done"], last["total"], last["unit"]) == (70, 70, "image")  # images, not bytes
    assert sum(summary["counts"].values()) == 70
    data = ham10000.load(store)
    assert data.synthetic is True
    assert len(data.metadata) == 70
    marker = json.loads(store.get_bytes(ham10000.SYNTHETIC_MARKER))
    assert marker["seed"] == 0 and marker["images"] == 70 and "not medical" in marker["note"]
    first = data.metadata.iloc[0]
    img = Image.open(io.BytesIO(store.get_bytes(first["key"])))
    assert img.size == (600, 450)
    spec = next(s for s in synthetic.plan(70, 0) if s.image_id == first["image_id"])
    assert store.get_bytes(first["key"]) == synthetic.render(spec)  # workers draw the same bytes
