"""MLflow tracking and TensorBoard events against real servers and readers: a real `mlflow
server` (tests/obs_servers.py) queried with MlflowClient, event files read back with
TensorBoard's own EventAccumulator. One tiny `skinlesion run` (and its rerun) serves most
tests; a train stage preempted and resumed checks that no step is logged twice."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest
from mlflow import MlflowClient
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.util import tensor_util

from skinlesion import cli, config, logs, registry, trainer
from skinlesion import train as train_lib
from skinlesion.errors import Terminated
from skinlesion.layout import TENSORBOARD_DIR, RunLayout, models_uri
from skinlesion.obs import mlflow_log
from skinlesion.storage import get_json, open_store
from skinlesion.synthetic import write_sample_data
from skinlesion.synthetic.metadata import MIN_IMAGES
from tests import obs_servers
from tests.runs import run_env, skinlesion_run
from tests.test_train import tiny_cfg, write_prepared

RUN_ID = "obs1"
PER_EPOCH = ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate")
PER_EPOCH += ("images_per_second", "epoch_seconds")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def the_run(client: MlflowClient, experiment: str, run_id: str) -> Any:
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment}"
    runs = client.search_runs([exp.experiment_id], f"tags.`{mlflow_log.RUN_TAG}` = '{run_id}'")
    assert len(runs) == 1, f"{len(runs)} MLflow runs for pipeline run {run_id}"
    return runs[0]


def steps(client: MlflowClient, rid: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(rid, key))


def events(path: Path) -> ea.EventAccumulator:
    acc = ea.EventAccumulator(str(path), size_guidance={ea.TENSORS: 0})
    acc.Reload()
    return acc


def scalars(acc: ea.EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}


@pytest.fixture
def tracking(mlflow_uri: str, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    """This process logs to the test server, in an experiment of its own."""
    monkeypatch.setenv(mlflow_log.TRACKING_ENV, mlflow_uri)
    monkeypatch.setenv(mlflow_log.EXPERIMENT_ENV, unique("exp"))
    monkeypatch.setattr(mlflow_log, "_session", mlflow_log._Session())  # a fresh process
    return MlflowClient(mlflow_uri)


# --- one tiny pipeline run, rerun once -------------------------------------------------------


@pytest.fixture(scope="module")
def e2e(mlflow_uri: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    store = str(tmp_path_factory.mktemp("obs-e2e") / "store")
    names = {"experiment": unique("e2e"), "model": unique("model")}
    env = {
        **run_env(),
        mlflow_log.TRACKING_ENV: mlflow_uri,
        mlflow_log.EXPERIMENT_ENV: names["experiment"],
        mlflow_log.MODEL_ENV: names["model"],
    }
    first = skinlesion_run(store, run_id=RUN_ID, env=env)
    assert first.returncode == 0, first.stderr[-4000:]
    again = skinlesion_run(store, run_id=RUN_ID, env=env)  # every stage skipped: a resume
    assert again.returncode == 0, again.stderr[-4000:]
    return {"store": store, "stderr": first.stderr, "client": MlflowClient(mlflow_uri), **names}


@pytest.mark.slow
def test_one_mlflow_run_per_pipeline_run_with_the_resolved_config(e2e: dict[str, Any]) -> None:
    client = e2e["client"]
    run = the_run(client, e2e["experiment"], RUN_ID)  # every stage process and both loops
    assert run.info.status == "FINISHED" and run.info.run_name == RUN_ID
    flat: dict[str, str] = {}
    for section, values in config.to_dict(config.load_pipeline("tiny")).items():
        if isinstance(values, dict):
            flat |= {f"{section}.{k}": str(v) for k, v in values.items()}
        else:
            flat[section] = str(values)
    assert run.data.params == flat
    layout = RunLayout(e2e["store"], RUN_ID)
    assert run.data.tags["skinlesion.evaluate.uri"] == open_store(layout.stage_uri("evaluate")).uri
    assert not [e for e in json_lines(e2e["stderr"]) if e["event"].startswith("mlflow_")]


@pytest.mark.slow
def test_curves_per_epoch_final_metrics_and_artifacts(e2e: dict[str, Any]) -> None:
    client, layout = e2e["client"], RunLayout(e2e["store"], RUN_ID)
    rid = the_run(client, e2e["experiment"], RUN_ID).info.run_id
    tiny = config.load_pipeline("tiny").train
    for stage, epochs in (("train", tiny.top_epochs), ("finetune", tiny.finetune_epochs)):
        history = get_json(open_store(layout.stage_uri(stage)), "history.json")
        for name in PER_EPOCH:  # once per epoch, also after the rerun
            assert steps(client, rid, f"{stage}.{name}") == list(range(1, epochs + 1)), name
        losses = {m.step: m.value for m in client.get_metric_history(rid, f"{stage}.loss")}
        assert losses == pytest.approx(dict(zip(history["epoch"], history["loss"], strict=True)))
        manifest = get_json(open_store(layout.stage_uri(stage)), "manifest.json")
        final = client.get_run(rid).data.metrics
        assert final[f"{stage}.best_val_accuracy"] == pytest.approx(manifest["best_val_accuracy"])
    metrics = get_json(open_store(layout.stage_uri("evaluate")), "metrics.json")
    final = client.get_run(rid).data.metrics
    assert final["balanced_accuracy"] == pytest.approx(metrics["balanced_accuracy"])
    assert final["roc_auc_macro"] == pytest.approx(metrics["roc_auc_macro"])
    artifacts = {
        a.path for d in ("evaluate", "train", "promote") for a in client.list_artifacts(rid, d)
    }
    assert {
        "evaluate/report.html",
        "evaluate/metrics.json",
        "evaluate/confusion_matrix.png",
        "evaluate/roc.png",
        "train/training_curves.png",
        "train/history.json",
        "promote/decision.json",
    } <= artifacts


@pytest.mark.slow
def test_promotion_registers_the_model_with_alias_champion(
    e2e: dict[str, Any], tmp_path: Path
) -> None:
    client, layout = e2e["client"], RunLayout(e2e["store"], RUN_ID)
    decision = get_json(open_store(layout.stage_uri("promote")), "decision.json")
    assert decision["promoted"]  # the first run of a store: no champion to beat
    mv = client.get_model_version_by_alias(e2e["model"], mlflow_log.CHAMPION)
    assert mv.tags[mlflow_log.VERSION_TAG] == str(decision["version"])
    assert mv.run_id == the_run(client, e2e["experiment"], RUN_ID).info.run_id
    assert len(client.search_model_versions(f"name = '{e2e['model']}'")) == 1  # rerun: no new
    local = client.download_artifacts(
        mv.run_id, f"{mlflow_log.MODEL_ARTIFACT}/model.keras", str(tmp_path)
    )
    version = open_store(models_uri(e2e["store"])).child(registry.version_key(decision["version"]))
    assert (
        hashlib.sha256(Path(local).read_bytes()).hexdigest()
        == get_json(version, "manifest.json")["files"]["model.keras"]["sha256"]
    )


@pytest.mark.slow
def test_training_stages_commit_tensorboard_events(e2e: dict[str, Any]) -> None:
    layout = RunLayout(e2e["store"], RUN_ID)
    tiny = config.load_pipeline("tiny").train
    for stage, epochs in (("train", tiny.top_epochs), ("finetune", tiny.finetune_epochs)):
        out = open_store(layout.stage_uri(stage))
        listed = [
            k for k in get_json(out, "manifest.json")["files"] if k.startswith(TENSORBOARD_DIR)
        ]
        assert len(listed) == 1 and "tfevents" in listed[0]
        acc = events(Path(out.uri.removeprefix("file://")) / TENSORBOARD_DIR)
        history = get_json(out, "history.json")
        want = list(range(1, epochs + 1))
        for tag in ("loss/train", "accuracy/val", "learning_rate", "images_per_second"):
            assert sorted(scalars(acc, tag)) == want, (stage, tag)
            assert acc.SummaryMetadata(tag).plugin_data.plugin_name == "scalars"
        assert scalars(acc, "loss/val") == pytest.approx(
            dict(zip(want, history["val_loss"], strict=True))
        )
        (image,) = acc.Tensors("confusion_matrix/val")
        assert acc.SummaryMetadata("confusion_matrix/val").plugin_data.plugin_name == "images"
        assert image.step == epochs
        png = tensor_util.make_ndarray(image.tensor_proto)[2]
        assert png.startswith(b"\x89PNG")


@pytest.mark.slow
def test_long_steps_log_progress_lines_in_a_pod(e2e: dict[str, Any]) -> None:
    lines = [e for e in json_lines(e2e["stderr"]) if e["event"] == "progress"]
    tasks = {line["task"] for line in lines}
    expected = {"prepare", "augment", "train epoch 1/2", "finetune epoch 1/1", "evaluate"}
    expected |= {"train upload", "train download", "val download", "train val"}
    assert expected <= tasks, tasks
    for line in lines:
        assert {"done", "total", "eta_s", "rate_per_s", "elapsed_s"} <= set(line), line


# --- a resumed training stage: no step twice ---------------------------------------------------


@pytest.mark.slow
def test_resumed_training_logs_every_epoch_once(
    tracking: MlflowClient, s3_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Preempted right after epoch 2's state backup (before its telemetry), then resumed:
    TensorBoard (on S3) and MLflow hold epochs 1, 2, 3 exactly once."""
    logs.configure(run_id="resume1", stage="train")
    data = open_store(str(tmp_path / "prepare"))
    write_prepared(data)
    out = open_store(f"{s3_uri}/runs/resume1/train")
    cfg = dataclasses.replace(tiny_cfg(top_epochs=3), lr_schedule="cosine")
    epoch_done = trainer.Trainer.epoch_done

    def preempted(self: trainer.Trainer, epoch: int, *args: Any) -> None:
        epoch_done(self, epoch, *args)
        if epoch + 1 == 2:
            raise Terminated()

    monkeypatch.setattr(trainer.Trainer, "epoch_done", preempted)
    with pytest.raises(Terminated):
        train_lib.run_train(cfg, "top", data, data, out)
    rid = the_run(tracking, os.environ[mlflow_log.EXPERIMENT_ENV], "resume1").info.run_id
    assert steps(tracking, rid, "train.loss") == [1]  # epoch 2 was backed up, not logged
    monkeypatch.setattr(trainer.Trainer, "epoch_done", epoch_done)
    manifest = train_lib.run_train(cfg, "top", data, data, out)
    assert manifest["resumed_from_epoch"] == 2
    for name in PER_EPOCH:
        assert steps(tracking, rid, f"train.{name}") == [1, 2, 3], name
    rates = [
        m.value
        for m in sorted(
            tracking.get_metric_history(rid, "train.learning_rate"), key=lambda m: m.step
        )
    ]
    assert rates[0] > rates[1] > rates[2] > 0  # the cosine schedule, also for replayed epochs

    listed = [o.key for o in out.list(TENSORBOARD_DIR)]
    assert len(listed) == 1  # the resumed attempt's file; the first one's was cleared
    local = tmp_path / "tb"
    out.get_file(listed[0], local / Path(listed[0]).name)
    acc = events(local)
    assert sorted(scalars(acc, "loss/train")) == [1, 2, 3]
    assert list(scalars(acc, "learning_rate").values()) == pytest.approx(rates)
    # TensorBoard's own S3 reader (used when TensorFlow is absent) reads the store directly.
    read_s3 = (
        "import sys; sys.modules['tensorflow'] = None\n"
        "from tensorboard.backend.event_processing import event_accumulator as ea\n"
        "acc = ea.EventAccumulator(sys.argv[1]); acc.Reload()\n"
        "print(sorted(e.step for e in acc.Tensors('loss/train')))\n"
    )
    env = {**os.environ, "S3_ENDPOINT": os.environ["AWS_ENDPOINT_URL"]}
    done = subprocess.run(
        [sys.executable, "-c", read_s3, f"{out.uri}/{TENSORBOARD_DIR}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[-2] == "[1, 2, 3]"


# --- failures and MLflow's rules ----------------------------------------------------------------


def test_unreachable_server_is_one_log_line_and_the_stage_succeeds(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys
) -> None:
    monkeypatch.setenv(mlflow_log.TRACKING_ENV, f"http://127.0.0.1:{obs_servers.free_port()}")
    monkeypatch.setattr(mlflow_log, "_session", mlflow_log._Session())
    raw, out = tmp_path / "raw", tmp_path / "prep"
    write_sample_data(open_store(str(raw)), images=MIN_IMAGES, seed=1)
    flags = ["--image-size", "32", "--val-fraction", "0.3"]
    code = cli.main(["prepare", "--run-id", "rdown", "--raw", str(raw), "--out", str(out), *flags])
    assert code == 0 and (out / "manifest.json").exists()
    failed = [e for e in json_lines(capsys.readouterr().err) if e["event"] == "mlflow_failed"]
    assert len(failed) == 1, failed
    mlflow_log.log_metrics("rdown", {"x": 1.0})  # off for the rest of the process: silent
    assert not [e for e in json_lines(capsys.readouterr().err) if e["event"] == "mlflow_failed"]


def test_params_never_change_and_a_change_is_named(tracking: MlflowClient, capsys) -> None:
    mlflow_log.log_params("rp", {"train": {"batch_size": 16, "backbone": "resnet152"}})
    mlflow_log.log_params(
        "rp", {"train": {"batch_size": 32, "backbone": "resnet152"}, "retries": 2}
    )
    run = the_run(tracking, os.environ[mlflow_log.EXPERIMENT_ENV], "rp")
    assert run.data.params == {
        "train.batch_size": "16",
        "train.backbone": "resnet152",
        "retries": "2",
    }
    kept = [e for e in json_lines(capsys.readouterr().err) if e["event"] == "mlflow_params_kept"]
    assert len(kept) == 1 and kept[0]["params"] == ["train.batch_size"]


def test_a_run_id_made_by_another_process_is_found_by_its_tag(tracking: MlflowClient) -> None:
    experiment = tracking.create_experiment(os.environ[mlflow_log.EXPERIMENT_ENV])
    theirs = tracking.create_run(experiment, tags={mlflow_log.RUN_TAG: "rtag"})
    mlflow_log.log_metrics("rtag", {"m": 2.0})
    mlflow_log.end_run("rtag", "cancelled")
    run = tracking.get_run(theirs.info.run_id)
    assert run.data.metrics == {"m": 2.0} and run.info.status == "KILLED"
    mlflow_log.start_run("rtag", {"a": 1})  # a resume: running again
    assert tracking.get_run(theirs.info.run_id).info.status == "RUNNING"


@pytest.fixture(autouse=True)
def _quiet_logs() -> Iterator[None]:
    logs.configure(run_id="-", stage="-")
    yield
    logs.configure(run_id="-", stage="-")


def test_rollback_moves_the_mlflow_champion_alias(
    tracking: MlflowClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = unique("model")
    monkeypatch.setenv(mlflow_log.MODEL_ENV, name)
    model = tmp_path / "model.keras"
    model.write_bytes(b"weights")
    first = mlflow_log.register_champion("rroll", model, 1)
    second = mlflow_log.register_champion("rroll", model, 2)
    assert first and second and first != second
    assert tracking.get_model_version_by_alias(name, mlflow_log.CHAMPION).version == second
    assert mlflow_log.move_champion(1) == first
    assert tracking.get_model_version_by_alias(name, mlflow_log.CHAMPION).version == first
    assert mlflow_log.move_champion(7) is None  # never registered in MLflow: named, kept
    assert tracking.get_model_version_by_alias(name, mlflow_log.CHAMPION).version == first
