"""Error types and the exit codes the CLI, jobs/ and the Helm chart agree on."""

from __future__ import annotations

# Exit codes: the chart's podFailurePolicy fails a Job at once on NOT_RETRIED (a new pod
# of the same Job cannot help); the pipeline never retries a stage that exits
# EXIT_BAD_INPUT or EXIT_DAMAGED_RUN; any other non-zero code of a stage is retried.
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_RUN_LOCKED = 3  # another live process writes this run: try again when it has ended
EXIT_DAMAGED_RUN = 4  # the run's stored outputs contradict each other: a rerun repairs them
EXIT_CANCELLED = 5  # `skinlesion cancel` marked the run: stopped, a rerun resumes it
# A stage failed on every attempt of its retry budget (or was preempted too often): the
# run stops. A restarted controller pod would spend a whole new budget on it, so the
# controller Job is not restarted; a rerun of the run id (after a fix) gets a new budget.
EXIT_STAGE_FAILED = 6
EXIT_INTERRUPTED = 143  # SIGTERM (128 + 15): pod eviction; state is saved, rerun resumes
EXIT_CTRL_C = 130  # SIGINT (128 + 2), the shell's convention for Ctrl-C
NOT_RETRIED = (EXIT_BAD_INPUT, EXIT_RUN_LOCKED, EXIT_DAMAGED_RUN, EXIT_CANCELLED, EXIT_STAGE_FAILED)


class SkinlesionError(Exception):
    """Base class; the message is one line meant for a person."""

    exit_code = EXIT_FAILURE


class InputError(SkinlesionError):
    """Bad user input (data, config, URI): retrying cannot help."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(InputError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"config field '{field}': {message}")
        self.field = field


class DataError(InputError):
    """A problem in the dataset, naming file, row and field where known."""


class StoreError(SkinlesionError):
    """The object store failed after retries (transient: worth retrying the stage)."""


class DamagedRun(SkinlesionError):
    """A run's committed outputs are inconsistent with each other (e.g. an evaluation of
    a model file that was overwritten since). Not bad input: rerunning the run recomputes
    the stale stages, whose fingerprints include their inputs' file hashes."""

    exit_code = EXIT_DAMAGED_RUN

    def __init__(self, problem: str) -> None:
        super().__init__(
            f"damaged run: its stored outputs are inconsistent ({problem}); "
            "rerun the same run id to repair it"
        )


class RunCancelled(SkinlesionError):
    exit_code = EXIT_CANCELLED


class StageFailed(SkinlesionError):
    def __init__(self, stage: str, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(f"stage '{stage}' failed: {message}")
        self.stage = stage
        self.exit_code = exit_code


class Terminated(BaseException):
    """SIGTERM received (pod eviction, Ctrl-C of a parent): save state and stop."""
