"""Pushgateway pushes and the run-end webhook, against real servers (tests/obs_servers.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from skinlesion import cli, config
from skinlesion.errors import StageFailed
from skinlesion.layout import RunLayout
from skinlesion.obs import pushgateway, webhook
from skinlesion.pipeline import Outcome, StageCall, run_pipeline
from skinlesion.storage import open_store
from skinlesion.synthetic import write_sample_data
from skinlesion.synthetic.metadata import MIN_IMAGES
from tests import obs_servers


@pytest.fixture
def pgw(pushgateway_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(pushgateway.PUSHGATEWAY_ENV, pushgateway_url)
    return pushgateway_url


def value(text: str, name: str, **labels: str) -> float:
    """The value of `name` whose labels include `labels` in a /metrics scrape."""
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            return float(m.group(2))
    raise AssertionError(f"{name} {labels} not in the scrape")


def test_failed_stage_pushes_exit_code_and_attempt(pgw: str, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv(pushgateway.ATTEMPT_ENV, "3")
    args = ["evaluate", "--run-id", "rfail", "--model", str(tmp_path / "none")]
    code = cli.main([*args, "--val-data", str(tmp_path / "v"), "--out", str(tmp_path / "o")])
    assert code != 0
    text = obs_servers.scrape(pgw)
    labels = {"job": "skinlesion", "stage": "evaluate", "run_id": "rfail"}
    assert value(text, "skinlesion_stage_exit_code", **labels) == code
    assert value(text, "skinlesion_stage_attempt", **labels) == 3
    assert value(text, "skinlesion_stage_duration_seconds", **labels) >= 0


def test_stage_push_has_images_and_eval_metrics(pgw: str) -> None:
    manifest = {"metrics": {"n_images": 40, "balanced_accuracy": 0.625, "roc_auc_macro": 0.75}}
    pushgateway.note_manifest(manifest)
    assert pushgateway.push_stage("evaluate", "rok", 0, 2.0)
    text = obs_servers.scrape(pgw)
    labels = {"stage": "evaluate", "run_id": "rok"}
    assert value(text, "skinlesion_stage_images_total", **labels) == 40
    assert value(text, "skinlesion_stage_images_per_second", **labels) == 20
    assert value(text, "skinlesion_eval_balanced_accuracy", **labels) == 0.625
    assert value(text, "skinlesion_eval_roc_auc_macro", **labels) == 0.75
    assert value(text, "skinlesion_stage_exit_code", **labels) == 0


def test_push_to_unreachable_gateway_is_logged_not_raised(monkeypatch, capsys) -> None:
    monkeypatch.setenv(pushgateway.PUSHGATEWAY_ENV, f"http://127.0.0.1:{obs_servers.free_port()}")
    assert pushgateway.push_stage("prepare", "r", 0, 1.0) is False
    assert "pushgateway_push_failed" in capsys.readouterr().err


class _FailingExecutor:
    """Runs no process: every stage exits with `code` (the loop's view of a Job's end)."""

    def __init__(self, code: int) -> None:
        self.code = code

    def attempts_used(self, call: StageCall, run_id: str) -> int:
        return 0

    def run(self, call: StageCall, run_id: str, attempt: int) -> Outcome:
        return Outcome("failed", self.code, "boom", f"exit code {self.code}")


@pytest.mark.parametrize("store", ["file", "s3"])
def test_failed_run_pushes_state_and_notifies_once(
    store: str, pgw: str, monkeypatch, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    cfg = config.load_pipeline("tiny")
    root = str(tmp_path) if store == "file" else request.getfixturevalue("s3_uri")
    run_id = f"rrun-{store}"
    layout = RunLayout(root, run_id)
    write_sample_data(open_store(layout.default_raw), images=MIN_IMAGES, seed=0)
    with obs_servers.receiver() as rec:
        monkeypatch.setenv(webhook.WEBHOOK_ENV, rec.url)
        with pytest.raises(StageFailed):
            run_pipeline(cfg, layout, _FailingExecutor(2))
    text = obs_servers.scrape(pgw)
    assert value(text, "skinlesion_run_state", stage="run", run_id=run_id, state="failed") == 1
    assert value(text, "skinlesion_run_state", stage="run", run_id=run_id, state="succeeded") == 0
    assert len(rec.bodies) == 1
    sent = json.loads(rec.bodies[0])
    assert sent["status"] == "failed" and sent["run_id"] == run_id
    assert sent["failed_stage"] == "prepare"
    assert sent["log_uri"].endswith("prepare-attempt-1.log")
    assert (
        open_store(sent["log_uri"].rsplit("/", 1)[0]).get_bytes("prepare-attempt-1.log") == b"boom"
    )
    assert f"{run_id}: failed" in sent["text"] and "prepare" in sent["text"]


def test_webhook_retries_after_500(monkeypatch) -> None:
    monkeypatch.setattr(webhook, "BACKOFF_S", 0.01)
    with obs_servers.receiver([500]) as rec:
        monkeypatch.setenv(webhook.WEBHOOK_ENV, rec.url)
        facts = {"metrics": {"balanced_accuracy": 0.5}, "promoted": True, "report_uri": "s3://b/r"}
        assert webhook.notify("r5", "succeeded", facts)
    assert len(rec.bodies) == 2
    text = json.loads(rec.bodies[1])["text"]
    assert "balanced_accuracy 0.500" in text and "promoted" in text and "s3://b/r" in text


def test_webhook_unreachable_gives_up_after_bounded_retries(monkeypatch, capsys) -> None:
    monkeypatch.setattr(webhook, "BACKOFF_S", 0.01)
    monkeypatch.setenv(webhook.WEBHOOK_ENV, f"http://127.0.0.1:{obs_servers.free_port()}/x")
    assert webhook.notify("r", "failed", {}) is False
    assert "webhook_failed" in capsys.readouterr().err


def test_prepare_stage_pushes_its_image_count(pgw: str, tmp_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "prep"
    write_sample_data(open_store(str(raw)), images=MIN_IMAGES, seed=1)
    flags = ["--image-size", "32", "--val-fraction", "0.3"]
    assert (
        cli.main(["prepare", "--run-id", "rprep", "--raw", str(raw), "--out", str(out), *flags])
        == 0
    )
    manifest = json.loads((out / "manifest.json").read_text())
    text = obs_servers.scrape(pgw)
    labels = {"stage": "prepare", "run_id": "rprep"}
    assert value(text, "skinlesion_stage_images_total", **labels) == manifest["n_images"] > 0
    assert value(text, "skinlesion_stage_images_per_second", **labels) > 0
    assert value(text, "skinlesion_stage_exit_code", **labels) == 0


def test_failed_rerun_keeps_the_last_success_timestamp(pgw: str) -> None:
    assert pushgateway.push_run("rsucc", "succeeded", 10.0, 6)
    first = value(
        obs_servers.scrape(pgw), "skinlesion_run_last_success_timestamp_seconds", run_id="rsucc"
    )
    assert pushgateway.push_run("rsucc", "failed", 1.0, 0)
    text = obs_servers.scrape(pgw)
    assert value(text, "skinlesion_run_last_success_timestamp_seconds", run_id="rsucc") == first
    assert value(text, "skinlesion_run_state", run_id="rsucc", state="failed") == 1
    assert value(text, "skinlesion_run_state", run_id="rsucc", state="succeeded") == 0
    assert value(text, "skinlesion_run_stages_done", run_id="rsucc") == 0
