"""The stage table is the one place a stage's inputs are named: the CLI's flags, the
plan's arguments and the stage functions' parameters all use its names."""

from __future__ import annotations

import inspect

from skinlesion import augment, cli, evaluate, prepare, promote, train
from skinlesion.stages import INPUTS, STAGES, job_inputs

FUNCTIONS = {
    "prepare": prepare.run_prepare,
    "augment": augment.run_augment,
    "train": train.run_train,
    "evaluate": evaluate.run_evaluate,
    "promote": promote.run_promote,
}


def test_each_stage_function_takes_its_inputs_by_the_tables_names() -> None:
    assert set(FUNCTIONS) == {s.job for s in STAGES}
    for job, fn in FUNCTIONS.items():
        params = inspect.signature(fn).parameters
        for spec, required in job_inputs(job):
            assert spec.name in params, (job, spec.name)
            default = params[spec.name].default
            assert (default is inspect.Parameter.empty) == required, (job, spec.name)


def test_each_stage_command_has_one_flag_per_input() -> None:
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    for job in FUNCTIONS:
        flags = {
            o: a.required
            for a in sub.choices[job]._actions  # type: ignore[attr-defined]
            for o in a.option_strings
        }
        for spec, required in job_inputs(job):
            assert flags[spec.flag] == required, (job, spec.flag)
    assert {i.name for s in STAGES for i in (INPUTS[n] for n in s.inputs)} == set(INPUTS)
