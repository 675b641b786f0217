"""The one progress helper (skinlesion/logs.py): a tqdm bar on a terminal, structured lines at
most every 30 s in a pod, with an injected clock (no test sleeps); the training callbacks
that use it and read the learning rate (skinlesion/train_callbacks.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from skinlesion import logs
from skinlesion.train_callbacks import StepProgress


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def progress_lines(err: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    return [line for line in lines if line["event"] == "progress"]


@pytest.fixture(autouse=True)
def pod_logs() -> None:
    logs.configure(run_id="r1", stage="prepare")  # capsys' stderr is no TTY: JSON lines


def test_pod_lines_at_most_every_30_s_with_done_total_and_eta(capsys) -> None:
    clock = FakeClock()
    with logs.Progress("prepare", 100, "image", clock=clock, terminal=False) as bar:
        for _ in range(100):
            clock.now += 1.0  # one image a second
            bar.update()
    lines = progress_lines(capsys.readouterr().err)
    assert [line["done"] for line in lines] == [30, 60, 90, 100]
    first = lines[0]
    assert first["task"] == "prepare" and first["total"] == 100 and first["unit"] == "image"
    assert first["percent"] == 30.0 and first["rate_per_s"] == 1.0
    assert first["eta_s"] == 70.0 and first["elapsed_s"] == 30.0
    assert not first["finished"]
    assert lines[-1]["finished"] and lines[-1]["eta_s"] == 0.0
    assert {line["run_id"] for line in lines} == {"r1"}  # bound context on every line


def test_irregular_updates_never_log_twice_within_30_s(capsys) -> None:
    clock = FakeClock()
    gaps = [0.1, 29.8, 0.2, 5, 40, 0.01, 0.01, 31, 12, 12, 12, 1]
    with logs.Progress("augment", len(gaps), clock=clock, terminal=False) as bar:
        for gap in gaps:
            clock.now += gap
            bar.update()
    lines = progress_lines(capsys.readouterr().err)
    running = [line for line in lines if not line["finished"]]
    times = [line["elapsed_s"] for line in running]
    assert times, "a 150 s step logs its progress before it ends"
    assert all(b - a >= 30 for a, b in zip([0.0, *times], times, strict=False))
    assert [line["finished"] for line in lines].count(True) == 1


def test_unknown_total_has_no_eta_and_bytes_are_counted(capsys) -> None:
    clock = FakeClock()
    items = logs.progress(iter(range(5)), None, "listing", clock=clock, terminal=False)
    for _ in items:
        clock.now += 20
    with logs.Progress("train upload", 3 * 2**20, "B", clock=clock, terminal=False) as bar:
        clock.now += 31
        bar.update(2**20)
    lines = progress_lines(capsys.readouterr().err)
    listing = [line for line in lines if line["task"] == "listing"]
    assert [line["done"] for line in listing] == [2, 4, 5]
    assert all(line["eta_s"] is None and line["percent"] is None for line in listing)
    upload = [line for line in lines if line["task"] == "train upload"]
    assert upload[0]["done"] == 2**20 and upload[0]["eta_s"] == 62.0


def test_terminal_gets_a_tqdm_bar_and_no_progress_lines(capsys) -> None:
    with logs.Progress("evaluate", 4, "batch", terminal=True) as bar:
        for _ in range(4):
            bar.update(1, loss="0.5")
    err = capsys.readouterr().err
    assert not progress_lines(err)
    assert "evaluate" in err and "4/4" in err


def test_each_epoch_reports_its_steps(capsys) -> None:
    steps = StepProgress("train", epochs=2, steps_per_epoch=3)
    for epoch in range(2):
        steps.on_epoch_begin(epoch)
        for batch in range(3):
            steps.on_train_batch_end(batch, logs={"loss": 1.0})
        steps.on_epoch_end(epoch)
    lines = progress_lines(capsys.readouterr().err)
    assert [(line["task"], line["done"], line["total"]) for line in lines] == [
        ("train epoch 1/2", 3, 3),
        ("train epoch 2/2", 3, 3),
    ]
    assert all(line["unit"] == "step" for line in lines)


def test_learning_rate_of_a_schedule_also_under_loss_scaling() -> None:
    import keras

    from skinlesion.train_callbacks import learning_rate_at

    schedule = keras.optimizers.schedules.CosineDecay(0.1, decay_steps=100, alpha=0.1)
    scaled = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(schedule))
    assert learning_rate_at(scaled, 0) == pytest.approx(0.1)
    assert learning_rate_at(scaled, 100) == pytest.approx(0.01)
    assert learning_rate_at(keras.optimizers.RMSprop(0.002), 50) == pytest.approx(0.002)
