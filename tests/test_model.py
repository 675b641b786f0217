"""The classifier: preprocessing inside the model, block selection, weights files."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import h5py
import keras
import numpy as np
import pytest

from skinlesion import config
from skinlesion import model as model_lib
from skinlesion.errors import InputError, SkinlesionError
from skinlesion.storage import Store

SIZE = 32


def tiny_cfg(**changes: object) -> config.TrainConfig:
    return dataclasses.replace(config.load_pipeline("tiny").train, **changes)  # type: ignore[arg-type]


def images(n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, SIZE, SIZE, 3)).astype("float32")


def base_weights(model: keras.Model) -> list[np.ndarray]:
    return [np.array(w) for w in model_lib.get_base(model).get_weights()]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "mobilenetv3small", "efficientnetb0"])
def test_model_preprocesses_inside_and_reloads_without_custom_objects(
    name: str, tmp_path: object
) -> None:
    net = model_lib.build_model(name, SIZE, dense_units=8, base_weights=None)
    assert net.input_shape == (None, SIZE, SIZE, 3)
    assert net.output_shape == (None, 7)
    assert net.get_layer("predictions").dtype_policy.compute_dtype == "float32"
    base = model_lib.get_base(net)
    x = images()
    # The features the model computes are the base's on its own preprocess_input output.
    features = keras.Model(net.input, net.get_layer("head_pool").output)(x)
    module = getattr(keras.applications, model_lib.BACKBONES[name].module)
    expected = keras.layers.GlobalAveragePooling2D()(
        base(module.preprocess_input(x.copy()), training=False)
    )
    np.testing.assert_allclose(np.array(features), np.array(expected), rtol=1e-4, atol=1e-4)
    if name == "resnet50":  # caffe mode: the model must not see raw 0..255 RGB
        raw = keras.layers.GlobalAveragePooling2D()(base(x, training=False))
        assert not np.allclose(np.array(features), np.array(raw), atol=1e-3)
    else:  # preprocessing is a layer inside the base (preprocess_input is a pass-through)
        assert isinstance(base.layers[1], keras.layers.Rescaling)
    path = tmp_path / "m.keras"  # type: ignore[operator]
    net.save(path)
    again = model_lib.load_model(path)
    np.testing.assert_allclose(np.array(again(x)), np.array(net(x)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "prefixes"),
    [
        ("resnet50", ("conv5_",)),
        ("mobilenetv3small", ("expanded_conv_10_", "conv_1")),
        ("efficientnetb0", ("block7a_", "top_")),
    ],
)
def test_unfreeze_block_selects_by_name_and_keeps_batchnorm_frozen(
    name: str, prefixes: tuple[str, ...]
) -> None:
    net = model_lib.build_model(name, SIZE, dense_units=8)
    model_lib.freeze_base(net)
    assert model_lib.block_prefixes(name) == prefixes
    unfrozen = model_lib.unfreeze_block(net, model_lib.block_prefixes(name))
    assert unfrozen
    base = model_lib.get_base(net)
    for layer in base.layers:
        in_block = layer.name.startswith(prefixes)
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        assert layer.trainable == (in_block and not is_bn), layer.name
    trainable = {id(v) for v in net.trainable_weights}
    base_trainable = [v for v in base.weights if id(v) in trainable]
    assert base_trainable
    assert all(v.path.split("/")[-2].startswith(prefixes) for v in base_trainable)
    for head in model_lib.HEAD_LAYERS:
        assert net.get_layer(head).trainable
    if name == "resnet50":  # the reference's choice: ResNet stage 5 only
        assert all(n.startswith("conv5_") for n in unfrozen)


def test_block_override_and_unknown_prefix() -> None:
    assert model_lib.block_prefixes("resnet152", " conv4_block36_, conv5_ ") == (
        "conv4_block36_",
        "conv5_",
    )
    net = model_lib.build_model("mobilenetv3small", SIZE, dense_units=8)
    with pytest.raises(InputError, match="'conv9_' matches no layer"):
        model_lib.unfreeze_block(net, ("conv9_",))
    with pytest.raises(InputError, match="unknown backbone"):
        model_lib.backbone("vgg16")


def test_weights_none_trains_the_whole_base_with_batchnorm_learning() -> None:
    net = model_lib.build_for_config(tiny_cfg(weights="none"), SIZE)
    base = model_lib.get_base(net)
    assert base.trainable and all(layer.trainable for layer in base.layers)
    assert len(net.trainable_weights) > len(net.get_layer("head_dense").weights) + 2
    # BatchNorm follows the training flag (learns statistics) only with random weights.
    bn = next(layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization))
    x = images(8)
    before = np.array(bn.moving_mean)
    net(x, training=True)
    assert not np.allclose(np.array(bn.moving_mean), before)


def _weights_roundtrip(store: Store) -> None:
    keras.utils.set_random_seed(1)
    source = model_lib.build_base("mobilenetv3small", 48)  # input size does not matter
    uri = f"{store.uri}/weights/mnv3.weights.h5"
    digest = model_lib.save_base_weights(source, uri)
    assert len(digest) == 64 and store.exists("weights/mnv3.weights.h5")
    keras.utils.set_random_seed(2)
    net = model_lib.build_for_config(tiny_cfg(weights=uri), SIZE)
    loaded = base_weights(net)
    expected = [np.array(w) for w in source.get_weights()]
    assert len(loaded) == len(expected)
    for a, b in zip(loaded, expected, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not model_lib.get_base(net).trainable  # pretrained base: frozen for phase top
    assert {v.path.split("/")[0] for v in net.trainable_weights} <= {
        "head_dense",
        "predictions",
    }


@pytest.mark.slow
def test_weights_file_roundtrip_file_store(file_store: Store) -> None:
    _weights_roundtrip(file_store)


@pytest.mark.slow
def test_weights_file_roundtrip_s3_store(s3_store: Store) -> None:
    _weights_roundtrip(s3_store)


@pytest.mark.slow
def test_missing_or_mismatched_weights_are_clear_input_errors(s3_store: Store) -> None:
    missing = f"{s3_store.uri}/nothing/here.weights.h5"
    with pytest.raises(InputError, match=re.escape(f"weights file not found: {missing}")):
        model_lib.build_for_config(tiny_cfg(weights=missing), SIZE)
    other = f"{s3_store.uri}/mnv3-alpha075.weights.h5"  # same layers, other shapes
    narrow = keras.applications.MobileNetV3Small(
        input_shape=(SIZE, SIZE, 3), include_top=False, weights=None, alpha=0.75
    )
    model_lib.save_base_weights(narrow, other)
    with pytest.raises(InputError, match=re.escape(f"weights file {other} holds mobilenetv3small")):
        model_lib.build_for_config(tiny_cfg(weights=other), SIZE)
    junk = f"{s3_store.uri}/junk.weights.h5"
    s3_store.put_bytes("junk.weights.h5", b"not an HDF5 file")
    with pytest.raises(InputError, match=re.escape(f"file {junk} holds weights of another")):
        model_lib.build_for_config(tiny_cfg(weights=junk), SIZE)
    with pytest.raises(InputError, match=r"must be a store URI of a \.weights\.h5"):
        model_lib.load_base_weights(model_lib.build_base("mobilenetv3small", SIZE), "x.h5")


@pytest.mark.slow
def test_weights_of_another_backbone_are_refused_naming_both(
    file_store: Store, tmp_path: Path
) -> None:
    """The backbone a file holds comes from the name `save_base_weights` records, or, for
    a file without it (e.g. one Keras wrote), from the known backbone it loads into."""
    uri = f"{file_store.uri}/effb0.weights.h5"
    model_lib.save_base_weights(model_lib.build_base("efficientnetb0", SIZE), uri)
    want = f"weights file {uri} holds efficientnetb0 weights, not mobilenetv3small weights"
    with pytest.raises(InputError, match=re.escape(want)):
        model_lib.build_for_config(tiny_cfg(weights=uri), SIZE)
    local = tmp_path / "effb0.weights.h5"
    file_store.get_file("effb0.weights.h5", local)
    with h5py.File(local, "a") as f:
        del f.attrs[model_lib.BACKBONE_ATTR]
    file_store.put_file(local, "effb0.weights.h5")
    with pytest.raises(InputError, match=re.escape(want)):
        model_lib.build_for_config(tiny_cfg(weights=uri), SIZE)


@pytest.mark.slow
def test_efficientnet_imagenet_file_gets_the_imagenet_normalisation(file_store: Store) -> None:
    """A mirrored ImageNet file loads into a base built without Keras' extra Rescaling:
    the Normalization variance takes its effect (same outputs as weights="imagenet")."""
    std = np.array([0.229, 0.224, 0.225], dtype="float32")
    source = model_lib.build_base("efficientnetb0", SIZE)
    norm = next(lyr for lyr in source.layers if isinstance(lyr, keras.layers.Normalization))
    mean = np.array([0.485, 0.456, 0.406], dtype="float32")
    norm.set_weights([mean, std**2, np.array(0)])
    uri = f"{file_store.uri}/effb0.weights.h5"
    model_lib.save_base_weights(source, uri)
    target = model_lib.build_base("efficientnetb0", SIZE)
    model_lib.load_base_weights(target, uri)
    t_norm = next(lyr for lyr in target.layers if isinstance(lyr, keras.layers.Normalization))
    x = np.full((1, 1, 1, 3), 200.0, dtype="float32") / 255.0
    got = np.array(t_norm(x)).ravel()
    want = ((x.ravel() - mean) / std) / np.sqrt(std)  # Keras' imagenet path
    np.testing.assert_allclose(got, want, rtol=1e-4)


@pytest.mark.slow
def test_set_model_weights_refreshes_normalisation() -> None:
    """EfficientNet's Normalization caches mean/variance: a weight transfer must refresh it."""
    source = model_lib.build_model("efficientnetb0", SIZE, dense_units=8)
    norm = next(
        lyr
        for lyr in model_lib.get_base(source).layers
        if isinstance(lyr, keras.layers.Normalization)
    )
    norm.set_weights([np.array([0.5, 0.4, 0.3]), np.array([0.04, 0.05, 0.06]), np.array(0)])
    norm.finalize_state()
    target = model_lib.build_model("efficientnetb0", SIZE, dense_units=8)
    model_lib.set_model_weights(target, source.get_weights())
    x = images()
    np.testing.assert_allclose(np.array(target(x)), np.array(source(x)), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_training_after_unfreeze_changes_only_the_block_and_head() -> None:
    keras.utils.set_random_seed(3)
    net = model_lib.build_model("mobilenetv3small", SIZE, dense_units=8)
    prefixes = model_lib.block_prefixes("mobilenetv3small")
    model_lib.unfreeze_block(net, prefixes)
    net.compile(optimizer=keras.optimizers.Adam(0.01), loss="categorical_crossentropy")
    base = model_lib.get_base(net)
    before = {lyr.name: [np.array(w) for w in lyr.get_weights()] for lyr in base.layers}
    head_before = [np.array(w) for w in net.get_layer("predictions").get_weights()]
    y = keras.utils.to_categorical(np.arange(8) % 7, 7)
    net.fit(images(8, seed=1), y, batch_size=4, epochs=2, verbose=0)
    for lyr in base.layers:
        after = [np.array(w) for w in lyr.get_weights()]
        pairs = zip(after, before[lyr.name], strict=True)
        changed = any(not np.array_equal(a, b) for a, b in pairs)
        trains = lyr.name.startswith(prefixes) and bool(lyr.weights)
        trains = trains and not isinstance(lyr, keras.layers.BatchNormalization)
        assert changed == trains, f"{lyr.name}: changed={changed}, expected {trains}"
    head_after = net.get_layer("predictions").get_weights()
    assert not np.array_equal(np.array(head_after[0]), head_before[0])


def test_imagenet_download_failure_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """No internet here: the Keras download fails; the message says what to do instead."""

    def offline(*args: object, **kwargs: object) -> None:
        raise Exception("URL fetch failure on https://example/weights.h5")  # as keras does

    monkeypatch.setattr(keras.utils, "get_file", offline)
    monkeypatch.setattr("keras.src.utils.file_utils.get_file", offline)
    with pytest.raises(SkinlesionError, match=r"mirror them to the store and pass --weights"):
        model_lib.build_for_config(tiny_cfg(weights="imagenet"), SIZE)
