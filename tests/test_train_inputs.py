"""The training input pipeline: from memory or streamed, the same samples, uint8, seeded."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

from skinlesion.storage import Store, open_store
from skinlesion.train_inputs import LABEL_BYTES, Inputs, Records, image_records
from tests.test_train import SIZE, TRAIN_PER_CLASS, VAL_PER_CLASS, write_prepared

N_TRAIN, N_VAL = sum(TRAIN_PER_CLASS), sum(VAL_PER_CLASS)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Store:
    store = open_store(str(tmp_path_factory.mktemp("inputs") / "prepare"))
    write_prepared(store)
    return store


def _records(data: Store) -> tuple[Records, Records]:
    root = Path(data.uri[len("file://") :])
    return (
        image_records(sorted(root.glob("train-*.tfrecord")), N_TRAIN, SIZE),
        image_records(sorted(root.glob("val-*.tfrecord")), N_VAL, SIZE),
    )


def _epochs(inputs: Inputs, batch: int, seeds: list[int]) -> list[np.ndarray]:
    """Per epoch, every sample's (label, pixel sum) in the order delivered."""
    steps = -(-N_TRAIN // batch)
    seen = []
    for x, y in inputs.train(batch, steps, seeds).as_numpy_iterator():
        assert x.dtype == np.uint8 and x.shape[1:] == (SIZE, SIZE, 3)  # preprocessing in-model
        assert y.shape[1] == 7
        seen += list(zip(y.argmax(1), x.reshape(len(x), -1).sum(1), strict=True))
    per = steps * batch
    return [np.array(seen[i * per : (i + 1) * per]) for i in range(len(seeds))]


def test_memory_and_stream_deliver_the_same_samples(data: Store) -> None:
    train, val = _records(data)
    memory = Inputs(train, val, 7, budget=train.decoded_bytes + val.decoded_bytes)
    stream = Inputs(train, val, 7, budget=0)
    assert (memory.path, stream.path) == ("memory", "stream")
    batch = 4  # 44 images: 11 steps, each epoch exactly the data once
    for a, b in zip(_epochs(memory, batch, [1, 2]), _epochs(stream, batch, [1, 2]), strict=True):
        assert sorted(map(tuple, a)) == sorted(map(tuple, b))  # the same images, labels
        assert np.bincount(a[:, 0].astype(int), minlength=7).tolist() == list(TRAIN_PER_CLASS)
    m1, m2 = _epochs(memory, batch, [1, 2])
    assert not np.array_equal(m1, m2), "each epoch has its own order"
    assert np.array_equal(_epochs(memory, batch, [2])[0], m2), "an epoch's order is its seed's"
    vals = [sorted(map(tuple, _val(i))) for i in (memory, stream)]
    assert vals[0] == vals[1] and len(vals[0]) == N_VAL


def _val(inputs: Inputs) -> np.ndarray:
    out = []
    for x, y in inputs.val(5).as_numpy_iterator():
        out += list(zip(y.argmax(1), x.reshape(len(x), -1).sum(1), strict=True))
    return np.array(out)


def test_raw_feature_records_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    shape = (2, 3)
    rows = np.empty(10, dtype=[("label", "<u2"), ("x", "<f2", shape)])
    rows["label"] = rng.integers(0, 7, 10)
    rows["x"] = rng.standard_normal((10, *shape))
    files = []
    for i, part in enumerate((rows[:6], rows[6:])):
        files.append(tmp_path / f"train-{i:05d}.f16")
        files[-1].write_bytes(part.tobytes())
    assert rows.dtype.itemsize == LABEL_BYTES + 2 * 6
    records = Records(tuple(files), 10, shape, "float16", "raw")
    x, y = records.load()  # the two files interleaved: compare as (label, sample) pairs
    got = sorted(zip(np.asarray(y).tolist(), np.asarray(x).reshape(10, -1).tolist(), strict=True))
    want = sorted(zip(rows["label"].tolist(), rows["x"].reshape(10, -1).tolist(), strict=True))
    assert got == want
    with pytest.raises(ValueError, match="11 listed"):
        Records(tuple(files), 11, shape, "float16", "raw").load()
