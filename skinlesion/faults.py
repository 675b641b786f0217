"""Named fault points: where the kill-matrix tests SIGKILL a stage (tests/test_kill_matrix.py).

`SKINLESION_FAULT=<stage>:<point>:<n>` (read once by the CLI's entry point, which calls
`arm`) makes the n-th pass through `point(name)` in that stage's process SIGKILL the
process's whole process group, the way a lost node or an OOM kill ends it: no clean-up,
no `finally`. The variable reaches every stage process of a local run, so `<stage>`
picks the one to kill (`run` is the run loop itself). Unarmed, `point` is one comparison.
"""

from __future__ import annotations

import os
import signal

from skinlesion.errors import InputError

ENV = "SKINLESION_FAULT"

# Each point, where it sits: what a kill there leaves behind.
POINTS: dict[str, str] = {
    "image": "prepare / augment: after an image is resized or an augmented variant made",
    "commit.claimed": "the owner mark written and the prefix cleared, nothing uploaded",
    "upload": "after a file is uploaded whole (outputs, resume state, model versions)",
    "commit.manifest": "after the manifest (the commit mark), before the stage cleans up",
    "batch": "train / finetune: after a training batch (mid-epoch)",
    "epoch": "train / finetune: an epoch ended, its resume state not yet backed up",
    "backup.model": "mid-backup: the epoch's model uploaded, state.json still the previous",
    "backup.state": "mid-backup: state.json written, the previous backup not yet pruned",
    "predict": "evaluate: after a batch of validation predictions",
    "stage_done": "run: a stage committed, the next one not started",
}

_target: str | None = None  # the armed point's name, in this process
_at = 0  # the pass that kills
_passes = 0


def parse(spec: str) -> tuple[str, str, int]:
    """(stage, point, n) of a `<stage>:<point>:<n>` spec; InputError when malformed."""
    parts = spec.split(":")
    n = parts[2] if len(parts) == 3 else ""
    if len(parts) != 3 or parts[1] not in POINTS or not n.isdigit() or int(n) < 1:
        raise InputError(
            f"{ENV}={spec!r}: expected <stage>:<point>:<n> with n >= 1 and a point "
            f"of {', '.join(POINTS)}"
        )
    return parts[0], parts[1], int(n)


def arm(spec: str | None, stage: str) -> None:
    """Arm the point of `spec` when it names this process's `stage` (None: disarm)."""
    global _target, _at, _passes
    _target, _at, _passes = None, 0, 0
    if spec:
        where, name, n = parse(spec)
        if where == stage:
            _target, _at = name, n


def point(name: str) -> None:
    """A named place in the code where a kill can be injected (a no-op unless armed)."""
    global _passes
    if name != _target:
        return
    _passes += 1
    if _passes == _at:
        os.killpg(os.getpgrp(), signal.SIGKILL)


def keras_callbacks() -> list[object]:
    """A Keras callback calling `point("batch")` after every training batch, only when that
    point is armed (else none, so that Keras keeps skipping its per-batch hooks)."""
    if _target != "batch":
        return []
    import keras

    class BatchPoint(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: object = None) -> None:
            point("batch")

    return [BatchPoint()]
