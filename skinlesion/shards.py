"""TFRecord shards: the hand-off format between prepare, augment, train and evaluate.

Each example holds the resized image as JPEG bytes, its integer label
(canonical class order), `image_id` and `lesion_id`. A stage manifest lists its
shards per split: `"shards": {"train": [{"file": "train-00000.tfrecord",
"count": 1000}, ...], "val": [...]}`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from skinlesion import logs
from skinlesion.errors import InputError
from skinlesion.results import Shards
from skinlesion.storage import Store


@dataclass(frozen=True)
class Example:
    jpeg: bytes
    label: int
    image_id: str
    lesion_id: str


def _tf() -> Any:
    import tensorflow as tf

    return tf


# The TFRecord schema: feature name -> value type (a tf.train.Feature list kind).
FEATURES: dict[str, str] = {
    "image": "bytes",  # JPEG
    "label": "int64",
    "image_id": "bytes",
    "lesion_id": "bytes",
}


def _values(ex: Example) -> dict[str, bytes | int]:
    return {
        "image": ex.jpeg,
        "label": ex.label,
        "image_id": ex.image_id.encode(),
        "lesion_id": ex.lesion_id.encode(),
    }


def _example(values: dict[str, Any]) -> Example:
    return Example(
        jpeg=bytes(values["image"]),
        label=int(values["label"]),
        image_id=values["image_id"].decode(),
        lesion_id=values["lesion_id"].decode(),
    )


def encode(ex: Example) -> bytes:
    tf = _tf()
    lists = {"bytes": tf.train.BytesList, "int64": tf.train.Int64List}
    values = _values(ex)
    feature = {
        name: tf.train.Feature(**{f"{kind}_list": lists[kind](value=[values[name]])})
        for name, kind in FEATURES.items()
    }
    proto = tf.train.Example(features=tf.train.Features(feature=feature))
    # Map entries in key order: the same example is the same bytes in every process, so a
    # rerun writes the same shards and the stages after it keep their fingerprints.
    return bytes(proto.SerializeToString(deterministic=True))


def parse(serialized: Any, names: tuple[str, ...] = tuple(FEATURES)) -> dict[str, Any]:
    """The features `names` of a serialized example, as tensors (in tf.data maps or eagerly)."""
    tf = _tf()
    dtypes = {"bytes": tf.string, "int64": tf.int64}
    spec = {name: tf.io.FixedLenFeature([], dtypes[FEATURES[name]]) for name in names}
    return dict(tf.io.parse_single_example(serialized, spec))


def decode(serialized: bytes) -> Example:
    """One serialized example, parsed in Python: for records read one at a time, where an
    eager `parse` would cost a TF op each."""
    feature = _tf().train.Example.FromString(serialized).features.feature
    return _example(
        {name: getattr(feature[name], f"{kind}_list").value[0] for name, kind in FEATURES.items()}
    )


class ShardWriter:
    """Streams examples into `<split>-NNNNN.tfrecord` files of `shard_size` examples."""

    def __init__(self, directory: Path, split: str, shard_size: int) -> None:
        self.directory, self.split, self.shard_size = directory, split, shard_size
        self.shards: list[dict[str, Any]] = []
        self._writer: Any = None
        self._count = 0

    def write(self, ex: Example) -> None:
        if self._writer is None or self._count >= self.shard_size:
            self._roll()
        self._writer.write(encode(ex))
        self._count += 1
        self.shards[-1]["count"] = self._count

    def _roll(self) -> None:
        if self._writer is not None:
            self._writer.close()
        name = f"{self.split}-{len(self.shards):05d}.tfrecord"
        self.directory.mkdir(parents=True, exist_ok=True)
        self._writer = _tf().io.TFRecordWriter(str(self.directory / name))
        self.shards.append({"file": name, "count": 0})
        self._count = 0

    def close(self) -> list[dict[str, Any]]:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return self.shards

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def iter_examples(paths: list[Path]) -> Iterator[Example]:
    """Every example of the shards, in order."""
    tf = _tf()
    for raw in tf.data.TFRecordDataset([str(p) for p in paths]):
        yield _example({name: value.numpy() for name, value in parse(raw).items()})


def labels(paths: list[Path]) -> np.ndarray:
    """The label of every example of the shards, in order."""
    tf = _tf()
    ds = tf.data.TFRecordDataset([str(p) for p in paths]).map(
        lambda raw: parse(raw, ("label",))["label"]
    )
    batches = list(ds.batch(8192).as_numpy_iterator())
    return np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)


def dataset(
    paths: list[Path],
    num_classes: int,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    repeat: bool = False,
) -> Any:
    """tf.data pipeline of (float32 image 0-255 [H, W, 3], one-hot label) batches."""
    tf = _tf()
    files = [str(p) for p in paths]
    ds = tf.data.TFRecordDataset(files, num_parallel_reads=tf.data.AUTOTUNE)
    if shuffle:
        ds = ds.shuffle(4096, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()

    def image_and_label(raw: Any) -> Any:
        ex = parse(raw)
        image = tf.cast(tf.io.decode_jpeg(ex["image"], channels=3), tf.float32)
        return image, tf.one_hot(ex["label"], num_classes)

    ds = ds.map(image_and_label, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def split_shards(listed: Shards, split: str, where: str) -> list[dict[str, Any]]:
    """The shard entries of `split` a stage result lists (`where` names it in errors)."""
    entries = listed.get(split)
    if not entries:
        raise InputError(f"{where}: its manifest lists no '{split}' shards")
    return list(entries)


def shard_count(listed: Shards, split: str, where: str) -> int:
    return sum(int(s["count"]) for s in split_shards(listed, split, where))


def fetch_split(store: Store, listed: Shards, split: str, dest: Path) -> list[Path]:
    """Download the shards of `split` that a committed stage result lists."""
    items = [
        (shard["file"], dest / split / shard["file"])
        for shard in split_shards(listed, split, store.uri)
    ]
    with logs.Progress(f"{split} download", len(items), "shard") as bar:
        store.get_files(items, lambda _: bar.update())  # in parallel on S3
    return [path for _, path in items]
