"""The one stage table: each stage's name, node pool, command and inputs.

The run loop's plan, the CLI's stage flags and the names under which a stage
fingerprints its inputs all come from here. An input's name is the key in the
manifest's `inputs`, the stage function's parameter and (dashed) the CLI flag.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Pool = Literal["cpu", "gpu"]


@dataclass(frozen=True)
class Input:
    name: str
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


INPUTS: dict[str, Input] = {
    i.name: i
    for i in (
        Input("raw", "store URI of a HAM10000 tree"),
        Input("prepared", "store URI of the prepare output"),
        Input("train_data", "training shards: the augment (or prepare) output URI"),
        Input("val_data", "the prepare output URI (its val split)"),
        Input("init_model", "the top phase's output URI (phase finetune)"),
        Input("model", "train/finetune output URI (model.keras)"),
        Input("candidate", "the evaluate output URI of the candidate model"),
    )
}


@dataclass(frozen=True)
class Stage:
    name: str  # also the store prefix runs/<id>/<name>/
    pool: Pool
    job: str  # CLI subcommand, jobs/<job>.py entrypoint and config section
    inputs: tuple[str, ...]  # keys of INPUTS, in flag order
    args: tuple[str, ...] = ()  # fixed flags of this stage's command

    @property
    def section(self) -> str:
        return self.job


STAGES: tuple[Stage, ...] = (
    Stage("prepare", "cpu", "prepare", ("raw",)),
    Stage("augment", "cpu", "augment", ("prepared",)),
    Stage("train", "gpu", "train", ("train_data", "val_data"), ("--phase", "top")),
    Stage(
        "finetune",
        "gpu",
        "train",
        ("train_data", "val_data", "init_model"),
        ("--phase", "finetune"),
    ),
    Stage("evaluate", "cpu", "evaluate", ("model", "val_data")),
    Stage("promote", "cpu", "promote", ("candidate", "model")),
)
STAGE_BY_NAME = {s.name: s for s in STAGES}


def job_inputs(job: str) -> list[tuple[Input, bool]]:
    """The inputs of a command, each with whether every stage running it needs it."""
    stages = [s for s in STAGES if s.job == job]
    names = dict.fromkeys(n for s in stages for n in s.inputs)
    return [(INPUTS[n], all(n in s.inputs for s in stages)) for n in names]
