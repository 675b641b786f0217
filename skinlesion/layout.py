"""Where everything lives in the store: the only code that knows the layout.

    <store>/raw/HAM10000/                    the dataset tree (metadata CSV + image folders)
    <store>/runs/<run-id>/lock.json          the run lock: one writer per run
    <store>/runs/<run-id>/cancelled.json     the cancel mark (`skinlesion cancel`)
    <store>/runs/<run-id>/<stage>/           a stage's outputs (owner.json first,
                                             manifest.json last; state/ while it trains)
    <store>/runs/<run-id>/<stage>/tensorboard/  TensorBoard event files (train, finetune)
    <store>/runs/<run-id>/logs/<stage>-attempt-<n>.log
    <store>/models/latest/                   the champion (model.keras, metrics.json, ...):
                                             a copy of the version the `champion` alias names
    <store>/models/registry.json             the model registry: versions, aliases, history
    <store>/models/versions/<n>/             version n (immutable once its manifest is written)
    <store>/models/serving/<n>/              version n's SavedModel export (when one is made)

The names of the files a stage writes that other stages read are here too.
"""

from __future__ import annotations

from dataclasses import dataclass

from skinlesion.keys import safe_run_id, safe_segment

RAW_TREE = "raw/HAM10000"
RUNS = "runs"
LOGS = "logs"
MODELS = "models"
CHAMPION = f"{MODELS}/latest"
REGISTRY_FILE = "registry.json"  # under models/, next to the champion prefix
CANCELLED = "cancelled.json"  # under the run's prefix

MODEL_FILE = "model.keras"  # train / finetune / champion
METRICS_FILE = "metrics.json"  # evaluate / champion
PREDICTIONS_FILE = "predictions.csv"  # evaluate
REPORT_FILE = "report.html"  # evaluate / champion
DECISION_FILE = "decision.json"  # promote
DATA_REPORT_FILE = "data_report.json"  # prepare: the data against the champion's
IMAGE_INDEX_FILE = "image_index.csv"  # prepare: one row per image (id, lesion, dx, sha256, ...)
TENSORBOARD_DIR = "tensorboard"  # train / finetune: event files, uploaded after every epoch


@dataclass(frozen=True)
class RunLayout:
    """The prefixes of one run in one store."""

    store_uri: str
    run_id: str

    def __post_init__(self) -> None:
        safe_run_id(self.run_id)

    @property
    def store(self) -> str:
        return self.store_uri.rstrip("/")

    @property
    def default_raw(self) -> str:
        return f"{self.store}/{RAW_TREE}"

    @property
    def run_uri(self) -> str:
        return f"{self.store}/{RUNS}/{self.run_id}"

    def stage_uri(self, stage: str) -> str:
        return f"{self.run_uri}/{stage}"

    @property
    def logs_uri(self) -> str:
        return f"{self.run_uri}/{LOGS}"

    @staticmethod
    def log_key(stage: str, attempt: int) -> str:
        """Under `logs_uri`: one file per attempt, never overwritten by a later one."""
        return f"{stage}-attempt-{attempt}.log"

    @staticmethod
    def logged_attempt(stage: str, key: str) -> int | None:
        """The attempt number of a `log_key` of `stage`, else None."""
        head, sep, tail = key.rpartition("-attempt-")
        number = tail.removesuffix(".log")
        if not sep or head != stage or not number.isdigit() or not tail.endswith(".log"):
            return None
        return int(number)

    @property
    def champion_uri(self) -> str:
        return champion_uri(self.store)


def champion_uri(store_uri: str) -> str:
    """The champion prefix of a store (no run needed)."""
    return f"{store_uri.rstrip('/')}/{CHAMPION}"


def models_uri(store_uri: str) -> str:
    """The registry's prefix of a store: `models/` (registry.json, versions/, serving/)."""
    return f"{store_uri.rstrip('/')}/{MODELS}"


VERSIONS = "versions"  # every version's prefix, relative to `models_uri`


def version_key(n: int) -> str:
    """Version n's prefix, relative to `models_uri`."""
    return f"{VERSIONS}/{n}"


def serving_key(n: int) -> str:
    """Version n's SavedModel export prefix, relative to `models_uri`."""
    return f"serving/{n}"


LATEST_KEY = CHAMPION.removeprefix(f"{MODELS}/")  # the champion copy, relative to models/


def run_of(store_uri: str, uri: str) -> str | None:
    """The run id of a prefix under `<store>/runs/<id>/`, else None."""
    prefix = f"{store_uri.rstrip('/')}/{RUNS}/"
    if not uri.startswith(prefix):
        return None
    run_id = uri[len(prefix) :].split("/", 1)[0]
    return run_id or None


def sibling_stage_uri(uri: str, name: str) -> str | None:
    """`…/runs/<id>/evaluate` -> `…/runs/<id>/<name>`; None when `uri` has no parent."""
    safe_segment(name, "stage name")
    base = uri.rstrip("/")
    scheme, sep, rest = base.partition("://")
    path = rest if sep else base
    if "/" not in path.strip("/"):
        return None
    parent = path.rsplit("/", 1)[0]
    return f"{scheme}{sep}{parent}/{name}" if sep else f"{parent}/{name}"
