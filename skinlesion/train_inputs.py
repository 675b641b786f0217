"""The input pipeline of a training phase: tf.data from the shards to the model, no Python
per image.

Samples are fixed-size records in files: the JPEG shards of prepare/augment (decoded to
uint8 images: the backbone's preprocessing is inside the model) or the raw feature files
of the feature cache (float16). Files are read in parallel (interleave), decoded in
parallel, batched and prefetched, all autotuned.

When the decoded samples of both splits fit in `memory_budget()`, they are decoded once
into memory and every epoch draws its batches from there by index (a full shuffle of the
indices per epoch seed; path "memory"); otherwise each epoch streams the files again
through a bounded shuffle buffer (path "stream"). The manifest records which.

Each epoch's order comes from its own seed (`train_seeds.epoch_seed`), so a resumed phase
sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from skinlesion import shards
from skinlesion.imaging import available_memory

MEMORY_SHARE = 0.25  # of the process's memory limit, for decoded samples held in memory
SHUFFLE_BYTES = 256 * 1024 * 1024  # the stream path's shuffle buffer, at most
SHUFFLE_RECORDS = 4096
READERS = 8  # files read at once
LOAD_BATCH = 32  # small batches keep decoding and copying overlapped
LABEL_BYTES = 2  # a raw record: uint16 label, then the sample
InputPath = Literal["memory", "stream"]


def _tf() -> Any:
    import tensorflow as tf

    return tf


@dataclass(frozen=True)
class Records:
    """`count` samples of `shape` and `dtype` in `files`: JPEG shards ("jpeg") or raw
    records of a uint16 label then the sample ("raw")."""

    files: tuple[Path, ...]
    count: int
    shape: tuple[int, ...]
    dtype: str  # uint8 (decoded images) | float16 (features)
    kind: Literal["jpeg", "raw"]

    @property
    def sample_bytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    @property
    def decoded_bytes(self) -> int:
        return self.count * self.sample_bytes

    def _files(self, seed: int | None) -> Any:
        """The records, files interleaved (in a seeded order of files when shuffling)."""
        tf = _tf()
        names = tf.data.Dataset.from_tensor_slices([str(p) for p in self.files])
        if seed is not None:
            names = names.shuffle(len(self.files), seed=seed)
        if self.kind == "jpeg":

            def read(name: Any) -> Any:
                return tf.data.TFRecordDataset(name)
        else:
            size = LABEL_BYTES + self.sample_bytes

            def read(name: Any) -> Any:
                return tf.data.FixedLengthRecordDataset(name, size)

        return names.interleave(
            read,
            cycle_length=min(READERS, len(self.files)),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )

    def decode(self, record: Any) -> Any:
        """(sample of `shape`/`dtype`, integer label) of one record."""
        tf = _tf()
        if self.kind == "jpeg":
            ex = shards.parse(record, ("image", "label"))
            image = tf.io.decode_jpeg(ex["image"], channels=3)
            return tf.ensure_shape(image, self.shape), tf.cast(ex["label"], tf.int32)
        label = tf.io.decode_raw(tf.strings.substr(record, 0, LABEL_BYTES), tf.uint16)[0]
        sample = tf.io.decode_raw(
            tf.strings.substr(record, LABEL_BYTES, self.sample_bytes), self.dtype
        )
        return tf.reshape(sample, self.shape), tf.cast(label, tf.int32)

    def ordered(self) -> Any:
        """Every sample once, in a fixed order (the files interleaved, READERS at once)."""
        tf = _tf()
        return self._files(None).map(self.decode, num_parallel_calls=tf.data.AUTOTUNE)

    def shuffled(self, seed: int) -> Any:
        """Every record (not decoded) again and again, shuffled by `seed` through a bounded
        buffer."""
        buffer = max(1, min(SHUFFLE_RECORDS, SHUFFLE_BYTES // max(1, self.sample_bytes)))
        return self._files(seed).shuffle(buffer, seed=seed, reshuffle_each_iteration=True).repeat()

    def load(self) -> tuple[Any, Any]:
        """All samples and labels as tensors, in `ordered()`'s order (decoded in parallel,
        copied batch by batch into one array)."""
        tf = _tf()
        samples = np.empty((self.count, *self.shape), dtype=self.dtype)
        labels = np.empty(self.count, dtype=np.int32)
        at = 0
        for xs, ys in self.ordered().batch(LOAD_BATCH).prefetch(2).as_numpy_iterator():
            if at + len(xs) > self.count:
                raise ValueError(
                    f"more samples in {self.files[0].parent} than the {self.count} listed"
                )
            samples[at : at + len(xs)] = xs
            labels[at : at + len(ys)] = ys
            at += len(xs)
        if at != self.count:
            raise ValueError(f"{at} samples in {self.files[0].parent}, {self.count} listed")
        with tf.device("/cpu:0"):
            return tf.constant(samples), tf.constant(labels)


def memory_budget() -> int:
    """Bytes of decoded samples a phase may hold in memory: MEMORY_SHARE of the process's
    memory limit (a pod's cgroup limit, else the machine's memory)."""
    return int(available_memory() * MEMORY_SHARE)


class Inputs:
    """The train and val datasets of a phase, from memory or streamed (`path`)."""

    def __init__(
        self, train: Records, val: Records, num_classes: int, budget: int, workers: int = 1
    ) -> None:
        """`workers` > 1 (several processes train together): streamed, each worker keeping
        its share of the batches (tf.data auto-sharding by data: any number of files)."""
        self.train_records, self.val_records, self.num_classes = train, val, num_classes
        self.workers = workers
        fits = train.decoded_bytes + val.decoded_bytes <= budget
        self.path: InputPath = "memory" if fits and workers == 1 else "stream"
        self._train: tuple[Any, Any] | None = None
        self._val: tuple[Any, Any] | None = None
        if self.path == "memory":
            self._train, self._val = train.load(), val.load()

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.train_records.shape

    def _finish(self, ds: Any) -> Any:
        tf = _tf()
        ds = ds.prefetch(tf.data.AUTOTUNE)
        if self.workers > 1:
            options = tf.data.Options()
            options.experimental_distribute.auto_shard_policy = (
                tf.data.experimental.AutoShardPolicy.DATA
            )
            ds = ds.with_options(options)
        return ds

    def _one_hot(self, x: Any, y: Any) -> Any:
        tf = _tf()
        x = tf.ensure_shape(x, [None, *self.sample_shape])  # static: MirroredStrategy pieces
        return x, tf.one_hot(y, self.num_classes)

    def _gather(self, held: tuple[Any, Any]) -> Callable[[Any], Any]:
        tf = _tf()
        samples, labels = held

        def gather(index: Any) -> Any:
            return self._one_hot(tf.gather(samples, index), tf.gather(labels, index))

        return gather

    def train(self, batch_size: int, steps: int, seeds: list[int]) -> Any:
        """`steps` batches per epoch, one epoch per seed, each in its own seeded order. The
        epochs' orders are chained first, then gathered or decoded by one map (traced once)."""
        tf = _tf()
        per_epoch = steps * batch_size  # whole batches: an epoch may wrap around the data
        if self._train is not None:
            n = self.train_records.count
            orders = [
                tf.data.Dataset.range(n)
                .shuffle(n, seed=s, reshuffle_each_iteration=True)
                .repeat()
                .take(per_epoch)
                for s in seeds
            ]
            indices = functools.reduce(lambda a, b: a.concatenate(b), orders)
            ds = indices.batch(batch_size).map(
                self._gather(self._train), num_parallel_calls=tf.data.AUTOTUNE
            )
        else:
            records = [self.train_records.shuffled(s).take(per_epoch) for s in seeds]
            ds = (
                functools.reduce(lambda a, b: a.concatenate(b), records)
                .map(self.train_records.decode, num_parallel_calls=tf.data.AUTOTUNE)
                .batch(batch_size)
                .map(self._one_hot)
            )
        return self._finish(ds)

    def val(self, batch_size: int) -> Any:
        tf = _tf()
        n = self.val_records.count
        if self._val is not None:
            ds = tf.data.Dataset.range(n).batch(batch_size).map(self._gather(self._val))
        else:
            ds = self.val_records.ordered().batch(batch_size).map(self._one_hot)
        # A known length spares Keras' "ran out of data" warning and checks the listing.
        ds = ds.apply(tf.data.experimental.assert_cardinality(math.ceil(n / batch_size)))
        return self._finish(ds)


def image_records(paths: list[Path], count: int, image_size: int) -> Records:
    return Records(tuple(paths), count, (image_size, image_size, 3), "uint8", "jpeg")
