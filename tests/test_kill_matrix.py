"""The kill matrix: SIGKILL at named points inside every stage (skinlesion/faults.py),
each followed by a rerun of the same run id.

One uninterrupted run is the reference. Each case starts from the store as that run left
it when the killed stage started (its earlier stages, byte for byte, at the same path),
runs `skinlesion run` with `SKINLESION_FAULT=<stage>:<point>:<n>` (the point's n-th pass
kills the run's whole process group, like a lost node) and reruns it unarmed. Then:

- the kill left no partial output that reads as complete: every committed manifest's
  files are there with its sha256, and no stage after the killed one is committed;
- the rerun finishes; it skips exactly the stages committed before the kill, resumes
  training at the last backed-up epoch and trains every later epoch once;
- its outputs are the reference's: the same files with the same bytes (for a model, its
  weights; `report.html` and `history.json` record times), the same manifest fields and
  counts (the promotion's decision included), the same fingerprints up to and including
  the first stage made again whose bytes are not reproducible (after it, a stage's inputs
  include a new `model.keras` or `report.html`, which record when they were made: a
  second uninterrupted run differs there too), the same registry versions and aliases;
- nothing is left over: no resume state, no file a manifest does not list.

`n` is drawn per case from a seeded generator (KILL_MATRIX_SEED, default below) within
the point's range in the reference run. `make test` runs the unmarked cases, `make soak`
all of them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from skinlesion import faults
from skinlesion.layout import CHAMPION, MODEL_FILE, MODELS, REGISTRY_FILE, RUNS, TENSORBOARD_DIR
from skinlesion.manifest import MANIFEST, OWNER, STATE_PREFIX
from skinlesion.stages import STAGES
from skinlesion.storage import FileStore
from skinlesion.train_callbacks import EPOCH_FIGURES
from tests.runs import RUN_TIMEOUT_S, run_command, run_env

pytestmark = pytest.mark.slow

RUN = "km"
ORDER = [s.name for s in STAGES]
TRAINING = ("train", "finetune")
# Stages whose outputs are not the same bytes when made again: `model.keras` records its
# save time, `report.html` its creation time. The fingerprints of the stages after one of
# them differ between two uninterrupted runs too.
UNREPRODUCIBLE = ("train", "finetune", "evaluate")
# Two epochs in both phases: a kill in the second resumes from the first's backup.
SETTINGS = ("--set", "train.top_epochs=2", "--set", "train.finetune_epochs=2")
SEED = int(os.environ.get("KILL_MATRIX_SEED", "20261206"))
# Manifest fields that say when or how fast, or that a resume happened (checked apart).
TIMING_FIELDS = {
    "created_at",
    "started_at",
    "promoted_at",
    "seconds",
    "images_per_s",
    "resumed_from_epoch",
    "extract_seconds",  # data_path: the feature cache's extraction
}
# Fields derived from upstream bytes: compared up to the first retrained training stage.
UPSTREAM_FIELDS = {
    "fingerprint",
    "inputs",
    "model_sha256",
    "model_fingerprint",
    "evaluation_fingerprint",
}


@dataclass(frozen=True)
class Reference:
    root: Path  # the store every case runs in
    snapshot: Path  # the reference run's store, kept
    outputs: dict[str, Any]  # outputs(snapshot)
    counts: dict[str, int]  # the ranges the kill points are drawn from


@dataclass(frozen=True)
class Case:
    stage: str  # the process killed ("run": the run loop)
    point: str
    span: Callable[[dict[str, int]], tuple[int, int]]  # the range of n, from the counts
    why: str
    start: str | None = None  # the stage the store is restored to the start of

    @property
    def killed_stage(self) -> str:
        return self.start or self.stage


def one(_: dict[str, int]) -> tuple[int, int]:
    return 1, 1


def up_to(key: str, first: int = 1) -> Callable[[dict[str, int]], tuple[int, int]]:
    return lambda c: (first, c[key])


def copying_latest(c: dict[str, int]) -> tuple[int, int]:
    """An upload of the champion's copy under models/latest (after its version's)."""
    return c["champion_files"] + 1, 2 * c["champion_files"]


def in_epoch(phase: str, epoch: int) -> Callable[[dict[str, int]], tuple[int, int]]:
    """A batch strictly inside the epoch (1-based) of `phase`."""

    def span(c: dict[str, int]) -> tuple[int, int]:
        steps = c[f"{phase}_steps"]
        return (epoch - 1) * steps + 1, epoch * steps - 1

    return span


CASES: list[tuple[Case, bool]] = [  # (case, in `make test` too)
    (Case("prepare", "image", up_to("prepare_images"), "mid-resize"), False),
    (Case("prepare", "upload", up_to("prepare_files"), "mid-upload"), False),
    (Case("prepare", "commit.manifest", one, "committed, not cleaned up"), False),
    (Case("augment", "image", up_to("augment_images"), "mid-augmentation"), False),
    (Case("augment", "commit.claimed", one, "prefix claimed, nothing uploaded"), False),
    (Case("augment", "upload", up_to("augment_files"), "mid-upload"), False),
    (Case("train", "commit.claimed", one, "prefix claimed, no epoch"), False),
    (Case("train", "batch", in_epoch("train", 1), "mid-epoch 1, no backup yet"), False),
    (Case("train", "batch", in_epoch("train", 2), "mid-epoch 2"), False),
    (Case("train", "epoch", up_to("train_epochs"), "epoch ended, not backed up"), False),
    (Case("train", "backup.model", up_to("train_epochs"), "mid-backup"), False),
    (Case("train", "backup.state", one, "backup complete, not pruned"), True),
    (Case("train", "commit.manifest", one, "committed, resume state not dropped"), False),
    (Case("finetune", "batch", in_epoch("finetune", 2), "mid-epoch 2"), False),
    (Case("finetune", "epoch", up_to("finetune_epochs"), "epoch ended, not backed up"), False),
    (Case("finetune", "backup.model", up_to("finetune_epochs"), "mid-backup"), False),
    (Case("finetune", "backup.state", up_to("finetune_epochs", 2), "last backup"), False),
    (Case("evaluate", "predict", up_to("evaluate_batches"), "mid-prediction"), False),
    (Case("evaluate", "upload", up_to("evaluate_files"), "mid-upload"), False),
    (Case("evaluate", "commit.manifest", one, "committed, not cleaned up"), False),
    (Case("promote", "upload", up_to("champion_files"), "mid-version upload"), False),
    (Case("promote", "upload", copying_latest, "version listed, mid-copy to latest"), True),
    (Case("run", "stage_done", up_to("finetune_to_promote"), "between stages", "finetune"), False),
]


def _params() -> list[Any]:
    params = []
    seen: dict[str, int] = {}
    for case, fast in CASES:
        name = f"{case.stage}:{case.point}"
        seen[name] = seen.get(name, 0) + 1
        label = name if seen[name] == 1 else f"{name}#{seen[name]}"
        marks = [] if fast else [pytest.mark.soak]
        params.append(pytest.param(case, id=label, marks=marks))
    return params


# --- reading a store ----------------------------------------------------------------------


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def weights(h5: Any) -> str:
    """The variables of a Keras weights file by name and value (HDF5's byte layout is not
    reproducible: the same weights can be laid out differently)."""
    import h5py

    digest = hashlib.sha256()
    with h5py.File(h5, "r") as f:

        def add(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                digest.update(name.encode() + obj[()].tobytes())

        f.visititems(add)
    return digest.hexdigest()


def events_content(path: Path) -> str:
    """A TensorBoard event file's summaries by step and tag, without wall times and the
    figures that time the epoch (the file's name records its host, pid and start time)."""
    import tensorflow as tf

    timed = {EPOCH_FIGURES["seconds"][0], EPOCH_FIGURES["images_per_s"][0]}
    rows = []
    for event in tf.compat.v1.train.summary_iterator(str(path)):
        for value in event.summary.value:
            if value.tag not in timed:
                rows.append((event.step, value.tag, value.tensor.SerializeToString().hex()))
    return _sha(json.dumps(sorted(rows)).encode())


def content(path: Path) -> str | None:
    """What a committed file holds, without what records when or how it was made: a
    model's weights (its config records object ids, its metadata the save time), a
    history's metrics (not the epochs' seconds); None for the report (it prints its
    creation time)."""
    if path.name == MODEL_FILE:
        with zipfile.ZipFile(path) as z:
            return weights(io.BytesIO(z.read("model.weights.h5")))
    if path.name.endswith(".weights.h5"):
        return weights(path)
    if path.name == "history.json":
        history = {k: v for k, v in _json(path).items() if k not in TIMING_FIELDS}
        return _sha(json.dumps(history, sort_keys=True).encode())
    if path.name == "report.html":
        return None
    if path.parent.name == TENSORBOARD_DIR:
        return events_content(path)
    return _sha(path.read_bytes())


def file_name(key: str) -> str:
    """A committed file's key, with an event file's host, pid and start time left out."""
    head = key.rpartition("/")[0]
    return f"{head}/events" if head == TENSORBOARD_DIR else key


def committed(prefix: Path) -> dict[str, Any] | None:
    return _json(prefix / MANIFEST) if (prefix / MANIFEST).is_file() else None


def check_complete(prefix: Path) -> None:
    """A committed prefix holds every file its manifest lists, with the recorded bytes."""
    manifest = committed(prefix)
    assert manifest is not None, prefix
    for key, info in manifest["files"].items():
        path = prefix / key
        assert path.is_file(), f"{prefix}: {key} listed but missing"
        assert _sha(path.read_bytes()) == info["sha256"], f"{prefix}: {key} is not what was listed"


def prefixes(root: Path) -> dict[str, Path]:
    """Every committed-output prefix of the run and of the model registry."""
    found = {stage: root / RUNS / RUN / stage for stage in ORDER}
    found["champion"] = root / CHAMPION
    versions = root / MODELS / "versions"
    if versions.is_dir():
        for v in sorted(versions.iterdir()):
            found[f"version {v.name}"] = v
    return found


def outputs(root: Path, upstream_through: str | None = None) -> dict[str, Any]:
    """Each committed prefix: its manifest without timings (and, after the stage
    `upstream_through`, without the fields that hash upstream bytes) and its files'
    contents; the registry's versions, aliases and moves."""
    out: dict[str, Any] = {}
    dropped = {"files"}
    for name, prefix in prefixes(root).items():
        manifest = committed(prefix)
        timeless = _without(manifest or {}, TIMING_FIELDS)
        fields = {k: v for k, v in timeless.items() if k not in dropped}
        out[name] = manifest and {
            "fields": fields,
            "files": {file_name(key): content(prefix / key) for key in sorted(manifest["files"])},
        }
        if name == upstream_through:
            dropped |= UPSTREAM_FIELDS
    registry = root / MODELS / REGISTRY_FILE
    if registry.is_file():
        reg = _json(registry)
        out["registry"] = {
            "versions": [v["version"] for v in reg["versions"]],
            "aliases": reg["aliases"],
            "history": [(h["action"], h["champion"], h["from"]) for h in reg["history"]],
        }
    return out


def _without(fields: dict[str, Any], dropped: set[str]) -> dict[str, Any]:
    """`fields` less the keys in `dropped`, at any depth."""
    return {
        k: _without(v, dropped) if isinstance(v, dict) else v
        for k, v in fields.items()
        if k not in dropped
    }


def strays(root: Path) -> list[str]:
    """Files under a committed prefix that its manifest does not list (partial uploads,
    resume state), and any prefix with files but no manifest."""
    found = []
    for name, prefix in prefixes(root).items():
        if not prefix.is_dir():
            continue
        manifest = committed(prefix)
        listed = set(manifest["files"]) if manifest else set()
        for path in sorted(p for p in prefix.rglob("*") if p.is_file()):
            key = path.relative_to(prefix).as_posix()
            if key not in listed | {MANIFEST, OWNER}:
                found.append(f"{name}: {key}")
    return found


def events(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in stderr.splitlines() if x.startswith("{")]


def epochs_trained(lines: list[dict[str, Any]], phase: str) -> list[int]:
    return [x["epoch"] for x in lines if x.get("event") == "epoch" and x.get("phase") == phase]


def epochs_backed_up(root: Path, stage: str) -> int:
    """The last epoch of `stage` whose resume state is complete (state.json names it)."""
    state = prefixes(root)[stage] / STATE_PREFIX / "state.json"
    return int(_json(state)["epochs_done"]) if state.is_file() else 0


# --- fixtures -----------------------------------------------------------------------------


def _run(root: Path, fault: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in run_env().items() if k != faults.ENV}
    if fault:
        env[faults.ENV] = fault
    # Its own session: the armed point kills the run's process group, never pytest.
    return subprocess.run(
        run_command(FileStore(root).uri, *SETTINGS, run_id=RUN),
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        start_new_session=True,
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """The uninterrupted run, under a directory whose name has a space and a non-ASCII
    letter (every stage reopens the URIs the previous ones recorded: none may be
    re-encoded), and the counts the kill points are drawn from."""
    base = tmp_path_factory.mktemp("kill-matrix")
    root = base / "dir with space \u00e9" / "store"
    done = _run(root, None)
    assert done.returncode == 0, done.stderr[-3000:]
    store_uri = FileStore(root).uri
    assert f"{store_uri}/runs/{RUN}/evaluate/report.html" in done.stdout
    assert not list(base.rglob("*%2*")), "something written under an encoded name"
    # The first promotion: version 1, the champion, with its SavedModel (printed at the end).
    assert f"model version 1 (champion): SavedModel {store_uri}/models/serving/1" in done.stdout
    assert (root / "models" / "serving" / "1" / "saved_model.pb").is_file()
    assert (root / "models" / "serving" / "1" / "manifest.json").is_file()
    assert (root / "runs" / RUN / "prepare" / "data_report.json").is_file()
    snapshot = base / "reference"
    shutil.copytree(root, snapshot, symlinks=True)
    stage = prefixes(root)
    prep, aug = committed(stage["prepare"]), committed(stage["augment"])
    assert prep is not None and aug is not None
    counts = {
        "prepare_images": prep["n_images"] + len(prep["skipped"]),
        "prepare_shards": sum(len(v) for v in prep["shards"].values()),
        "prepare_files": len(prep["files"]),
        "augment_images": aug["n_images"],
        "augment_shards": len(aug["shards"]["train"]),
        "augment_files": len(aug["files"]),
        "finetune_to_promote": len(ORDER) - 1 - ORDER.index("finetune"),
    }
    for phase, name in (("train", "train"), ("finetune", "finetune")):
        manifest = committed(stage[name])
        assert manifest is not None
        counts[f"{phase}_steps"] = -(-manifest["train_images"] // manifest["batch_size"])
        counts[f"{phase}_epochs"] = manifest["epochs_run"]
    evaluation = committed(stage["evaluate"])
    assert evaluation is not None
    batch = evaluation["settings"]["batch_size"]
    counts["evaluate_batches"] = -(-evaluation["metrics"]["n_images"] // batch)
    counts["evaluate_files"] = len(evaluation["files"])
    champion = committed(stage["champion"])
    assert champion is not None
    counts["champion_files"] = len(champion["files"])  # uploaded to its version, then latest
    return Reference(root, snapshot, outputs(snapshot), counts)


def restore(ref: Reference, killed_stage: str) -> None:
    """The store as the reference run left it when `killed_stage` started."""
    shutil.rmtree(ref.root, ignore_errors=True)
    shutil.copytree(ref.snapshot, ref.root, symlinks=True)
    found = prefixes(ref.root)
    for stage in ORDER[ORDER.index(killed_stage) :]:
        shutil.rmtree(found[stage], ignore_errors=True)
    shutil.rmtree(ref.root / MODELS, ignore_errors=True)


# --- the matrix ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", _params())
def test_killed_run_reruns_to_the_outputs_of_an_uninterrupted_run(
    case: Case, reference: Reference
) -> None:
    lo, hi = case.span(reference.counts)
    assert 1 <= lo <= hi, (case, reference.counts)
    rng = random.Random(f"{SEED}:{case.stage}:{case.point}:{lo}:{hi}")
    n = rng.randint(lo, hi)
    fault = f"{case.stage}:{case.point}:{n}"
    root = reference.root
    restore(reference, case.killed_stage)
    before = ORDER[: ORDER.index(case.killed_stage)]

    killed = _run(root, fault)
    assert killed.returncode == -signal.SIGKILL, (
        f"{fault} ({case.why}) was not reached: exit {killed.returncode}\n{killed.stderr[-2000:]}"
    )
    lines = events(killed.stderr)
    assert [x["step"] for x in lines if x.get("event") == "stage_skipped"] == before
    # No partial output reads as complete: what is committed is whole, nothing after it is.
    found = prefixes(root)
    done = [s for s in ORDER if committed(found[s]) is not None]
    for prefix in found.values():
        if committed(prefix) is not None:
            check_complete(prefix)
    killed_committed = case.point == "commit.manifest" or case.stage == "run"
    if case.stage == "run":
        assert done == ORDER[: len(before) + n], (fault, done)
    else:
        assert done == before + ([case.stage] if killed_committed else []), (fault, done)
    backed_up = {s: epochs_backed_up(root, s) for s in TRAINING}

    rerun = _run(root, None)
    assert rerun.returncode == 0, f"rerun after {fault}:\n{rerun.stderr[-3000:]}"
    lines = events(rerun.stderr)
    skipped = [x["step"] for x in lines if x.get("event") == "stage_skipped"]
    started = [x["step"] for x in lines if x.get("event") == "stage_start"]
    assert skipped == done, f"{fault}: finished stages redone, or unfinished ones skipped"
    assert started == ORDER[len(done) :], fault
    for stage, phase in (("train", "top"), ("finetune", "finetune")):
        if stage not in started:
            continue
        # Every epoch after the last complete backup, once; none before it again.
        total = reference.counts[f"{stage}_epochs"]
        resumed_at = backed_up[stage]
        assert epochs_trained(lines, phase) == list(range(resumed_at + 1, total + 1)), fault
        resuming = [
            x["epoch"] for x in lines if x.get("event") == "resuming" and x.get("phase") == phase
        ]
        assert resuming == ([resumed_at] if resumed_at else []), fault

    # The rerun ends where an uninterrupted run ends. Fingerprints are compared up to the
    # first unreproducible stage this case made again (in the killed run or the rerun).
    remade = next((s for s in ORDER[len(before) :] if s in UNREPRODUCIBLE), None)
    got = outputs(root, upstream_through=remade)
    want = outputs(reference.snapshot, upstream_through=remade)
    for name in want:
        assert got.get(name) == want[name], f"{fault}: {name} differs from the uninterrupted run"
    assert set(got) == set(want), fault
    assert strays(root) == [], f"{fault}: left over"
