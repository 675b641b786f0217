"""Where training runs: devices, distribution and the Keras dtype policy.

Mixed precision when a GPU is visible (`mixed_precision: auto`), and
`tf.distribute.MirroredStrategy` over all GPUs when there are several;
`batch_size` is the global batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import keras

from skinlesion import config


@dataclass(frozen=True)
class Runtime:
    strategy: Any
    gpus: int
    mixed_precision: bool

    @property
    def replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)

    def global_batch(self, batch_size: int) -> int:
        """`batch_size` rounded up to split evenly over the replicas (Keras builds a
        distributed model from the mean of the first batch's per-replica pieces: they must
        have one shape)."""
        return math.ceil(batch_size / self.replicas) * self.replicas


@contextlib.contextmanager
def dtype_policy(name: str) -> Iterator[None]:
    """Keras' global dtype policy `name` for the layers built inside; the previous one after."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


@contextlib.contextmanager
def select_runtime(cfg: config.TrainConfig) -> Iterator[Runtime]:
    """Precision and distribution from the visible GPUs; enter before any TF op initialises
    them. The dtype policy holds until exit."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        with contextlib.suppress(RuntimeError):  # already initialised in this process
            tf.config.experimental.set_memory_growth(gpu, True)
    mixed = cfg.mixed_precision == "on" or (cfg.mixed_precision == "auto" and bool(gpus))
    with dtype_policy("mixed_float16" if mixed else "float32"):
        strategy = (
            tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
        )
        yield Runtime(strategy=strategy, gpus=len(gpus), mixed_precision=mixed)
