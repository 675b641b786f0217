"""Fair promotion: champion and candidate scored on the same validation images, and the
gate on the lower bound of the paired lesion bootstrap of the gain."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from skinlesion import config, evaluate, fair
from skinlesion.classes import NUM_CLASSES
from skinlesion.metrics import compute_metrics
from skinlesion.promote import run_promote
from skinlesion.storage import Store, get_json
from tests.test_evaluate import tiny_model, write_augment, write_model, write_prepared

CFG = config.PromoteConfig(serving_export=False)  # SavedModel exports: tests/test_serving.py
EVAL = config.EvaluateConfig(batch_size=16, ece_bins=10)
PER_CLASS = (6,) * NUM_CLASSES


def sharp_model(image_size: int = 32) -> Any:
    """Near-perfect on write_prepared's images: their mean colour encodes the class
    (class k: about (40 + 30k, 200 - 20k, 90 + 10 (k mod 3))), read by a linear
    discriminant on the pooled colour."""
    import keras

    means = np.array(
        [[40 + 30 * k, 200 - 20 * k, 90 + 10 * (k % 3)] for k in range(NUM_CLASSES)], np.float32
    )
    inputs = keras.Input((image_size, image_size, 3), name="image")
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    dense = keras.layers.Dense(NUM_CLASSES, activation="softmax")
    outputs = dense(pooled)
    net = keras.Model(inputs, outputs)
    scale = 0.05
    dense.set_weights([scale * means.T, -scale * 0.5 * (means**2).sum(axis=1)])
    return net


def _run(
    store: Store,
    run_id: str,
    net: Any,
    data_seed: int,
    per_class: tuple[int, ...] = PER_CLASS,
    trained_lesions: tuple[str, ...] = (),
) -> dict:
    run = store.child("runs", run_id)
    prepared, augmented, model = run.child("prepare"), run.child("augment"), run.child("train")
    write_prepared(prepared, per_class=per_class, seed=data_seed, trained_lesions=trained_lesions)
    write_augment(augmented, prepared)
    write_model(model, net, augmented, prepared)
    evaluation = run.child("evaluate")
    evaluate.run_evaluate(EVAL, model, prepared, evaluation)
    return run_promote(CFG, evaluation, model, store.child("models", "latest"), run_id)


def test_same_images_use_the_recorded_predictions_and_a_clear_gain_promotes(
    file_store: Store,
) -> None:
    first = _run(file_store, "r1", tiny_model(seed=1), data_seed=0)["decision"]
    assert first["promoted"] and first["comparison"] is None  # no champion yet
    second = _run(file_store, "r2", sharp_model(), data_seed=0)["decision"]
    comparison = second["comparison"]
    assert comparison["how"] == fair.RECORDED
    assert comparison["n_images"] == sum(PER_CLASS)
    recorded = get_json(file_store, "runs/r1/evaluate/metrics.json")["balanced_accuracy"]
    assert second["champion"]["metric"] == pytest.approx(recorded)  # the same images
    lo, hi = comparison["gain"]["interval"]
    assert 0.0 < lo <= comparison["gain"]["gain"] <= hi
    assert second["promoted"] is True, second["reason"]
    assert "on the same images" in second["reason"] and "lower bound" in second["reason"]


@pytest.mark.slow
@pytest.mark.parametrize("store_kind", ["file", "s3"])
def test_a_champion_evaluated_on_other_images_is_rescored_on_the_candidates(
    store_kind: str, request: pytest.FixtureRequest
) -> None:
    store: Store = request.getfixturevalue(f"{store_kind}_store")
    champion_net = sharp_model()
    _run(store, "r1", champion_net, data_seed=0)
    decision = _run(store, "r2", tiny_model(seed=2), data_seed=1, per_class=(5,) * 7)["decision"]
    assert decision["comparison"]["how"] == fair.RESCORED
    assert decision["promoted"] is False
    # Independently: the champion model evaluated by the evaluate stage on r2's data.
    run2 = store.child("runs", "r2")
    check = store.child("check")
    evaluate.run_evaluate(EVAL, store.child("runs", "r1", "train"), run2.child("prepare"), check)
    expected = get_json(check, "metrics.json")["balanced_accuracy"]
    assert decision["champion"]["metric"] == pytest.approx(expected, abs=1e-9)
    assert decision["champion"]["recorded"]["metric"] == pytest.approx(
        get_json(store, "runs/r1/evaluate/metrics.json")["balanced_accuracy"]
    )
    assert decision["comparison"]["gain"]["interval"][1] < 0.0


def test_no_gain_on_the_same_images_does_not_promote(file_store: Store) -> None:
    _run(file_store, "r1", sharp_model(), data_seed=0)
    twin = sharp_model()  # the same function, another file
    decision = _run(file_store, "r2", twin, data_seed=0)["decision"]
    assert decision["comparison"]["gain"]["gain"] == pytest.approx(0.0, abs=1e-12)
    assert decision["promoted"] is False
    assert "its lower bound must exceed 0.0000" in decision["reason"]


@pytest.mark.slow
def test_images_of_lesions_the_champion_trained_on_are_left_out(file_store: Store) -> None:
    """A champion whose split put some of the candidate's validation lesions on its train
    side: those images would flatter it, so both models are compared without them."""
    trained = tuple(f"HAM_{i:07d}" for i in range(0, 20, 2))  # 10 of r2's 35 lesions
    _run(file_store, "r1", sharp_model(), data_seed=0, trained_lesions=trained)
    decision = _run(file_store, "r2", tiny_model(seed=2), data_seed=1, per_class=(5,) * 7)[
        "decision"
    ]
    comparison = decision["comparison"]
    assert comparison["how"] == fair.RESCORED
    assert comparison["left_out_champion_trained"] == {"checked": True, "lesions": 10, "images": 10}
    assert comparison["n_images"] == 25
    assert "left out: 10 images of 10 lesions the champion trained on" in decision["reason"]
    # Independently: both models' predictions on r2's data, less those 10 lesions.
    run2 = file_store.child("runs", "r2")
    check = file_store.child("check")
    evaluate.run_evaluate(
        EVAL, file_store.child("runs", "r1", "train"), run2.child("prepare"), check
    )
    for store, side in ((check, "champion"), (run2.child("evaluate"), "candidate")):
        kept = fair.read_predictions(store).without_lesions(frozenset(trained))
        assert len(kept.image_ids) == 25
        expected = compute_metrics(kept.labels, kept.proba)["balanced_accuracy"]
        assert comparison[side]["metric"] == pytest.approx(expected, abs=1e-9), side
    assert decision["candidate"]["metric"] == pytest.approx(  # its own figures: all 35
        get_json(run2.child("evaluate"), "metrics.json")["balanced_accuracy"]
    )


def test_without_the_champions_image_index_nothing_is_left_out(file_store: Store) -> None:
    _run(file_store, "r1", sharp_model(), data_seed=0)
    decision = _run(file_store, "r2", sharp_model(), data_seed=0)["decision"]
    left_out = decision["comparison"]["left_out_champion_trained"]
    assert left_out == {"checked": False, "lesions": 0, "images": 0}
    assert decision["comparison"]["candidate"] is None  # its own figures are on these images
