"""Per-epoch randomness: every epoch's shuffle order and dropout masks come from
(seed, phase, epoch) alone, so a phase resumed after epoch k trains epochs k+1.. exactly
as an uninterrupted run does (bit for bit under `tf.config.experimental.enable_op_determinism`).
"""

from __future__ import annotations

import random
from typing import Any

import keras
import numpy as np

_PHASES = ("top", "finetune")


def epoch_seed(seed: int, phase: str, epoch: int) -> int:
    """A 31-bit seed for 0-based `epoch` of `phase`, independent of what ran before."""
    state = np.random.SeedSequence([seed, _PHASES.index(phase), epoch]).generate_state(1)
    return int(state[0]) & 0x7FFFFFFF


class EpochSeeds(keras.callbacks.Callback):
    """At each epoch's start, reseeds Python's and NumPy's generators and every layer's own
    seed generator (dropout) from (seed, phase, epoch)."""

    def __init__(self, seed: int, phase: str) -> None:
        super().__init__()
        self.seed, self.phase = seed, phase

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        s = epoch_seed(self.seed, self.phase, epoch)
        # Python's and NumPy's generators; TF's global seed is set once per phase (the
        # datasets are built then, with their own seeds): re-setting it every epoch costs
        # ~0.1 s (eager caches cleared), and no op of a training step reads it.
        random.seed(s)
        np.random.seed(s)
        for i, gen in enumerate(seed_generators(self.model)):
            gen.state.assign(np.array([s, i], dtype=gen.state.dtype))


def seed_generators(model: Any) -> list[Any]:
    """The seed generators of `model`'s layers (nested models included), in layer order."""
    return [g for layer in model._flatten_layers() for g in layer._seed_generators]
