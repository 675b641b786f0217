"""Handoff benchmark: from a stage Job's end to the next stage Job's creation.

The real controller (`run_controller`, official client over HTTP) drives whole runs
against kmock. The fake kubelet of tests/kmock_server.py plays each stage as a
real one ends: it commits the stage's manifest into the store, then patches the
Job's status to Complete (or Failed, once per run, for the retry handoff). A
handoff is measured from just before that status patch is sent (so it includes
the patch, the watch delivery and the controller's own work: the skip-if-done
check reading the next stage's input manifests, the Job lookup and build) to the
moment kmock receives the next Job's create request.

Idle handoffs follow a Complete Job; failed handoffs follow a Failed Job (pod
listing, log tail, log upload to the store, then the retry's Job). Stores: a file
store, and SeaweedFS S3 (`weed mini`) as in production when it can be started.

`handoff_latency_s` is the median idle handoff with the S3 store (the file store when
SeaweedFS cannot start); `handoff_latency_max_s` the worst of every handoff measured
(idle and failed, both stores): the figure to hold against the 2 s requirement.
Environment: HANDOFF_BENCH_RUNS (runs per store, default 4).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
from pathlib import Path
from typing import Any

import yaml

from skinlesion import config, logs
from skinlesion.controller import run_controller
from skinlesion.kube import Kube
from skinlesion.layout import RunLayout
from skinlesion.stages import STAGES
from skinlesion.storage import open_store
from skinlesion.synthetic import write_sample_data
from tests import jobshape, s3server
from tests.kmock_server import FakeKubelet, KMock

NAMESPACE = "bench"
RELEASE = "sl"


def _stage_job(stage: str) -> dict[str, Any]:
    return jobshape.stage_job(stage, NAMESPACE, RELEASE, image="skinlesion:bench")


def _one_run(km: KMock, stages: Path, store: str, raw: str, run_id: str) -> dict[str, list[float]]:
    argv = [
        "controller", "--stages", str(stages), "--store", store, "--raw", raw,
        "--run-id", run_id, "--preset", "tiny", "--set", "retries=1", "--lease-seconds", "10",
    ]  # fmt: skip
    from skinlesion import cli

    args: argparse.Namespace = cli.build_parser().parse_args(argv)
    cfg = config.load_pipeline(args.preset, args.config, args.set)
    layout = RunLayout(store, run_id)
    kubelet = FakeKubelet(km, NAMESPACE, cfg, layout, raw, script={"train": ["fail:1"]})
    result: dict[str, Any] = {}

    def drive() -> None:
        try:
            result["code"] = run_controller(cfg, args, kube=Kube(km.configuration()))
        except BaseException as exc:
            result["error"] = exc

    with kubelet:
        thread = threading.Thread(target=drive, daemon=True)
        thread.start()
        thread.join(300)
    if result.get("code") != 0:
        raise RuntimeError(f"benchmark run {run_id} did not finish: {result}")
    created = {name: t for plural, name, t in km.created_at if plural == "jobs"}
    idle: list[float] = []
    failed: list[float] = []
    for prev, nxt in zip(kubelet.jobs, kubelet.jobs[1:], strict=False):
        p, n = prev["metadata"], nxt["metadata"]
        latency = created[n["name"]] - kubelet.finished_at[p["name"]]
        same_stage = (
            p["labels"]["app.kubernetes.io/component"] == n["labels"]["app.kubernetes.io/component"]
        )
        (failed if same_stage else idle).append(latency)
    return {"idle": idle, "failed": failed}


def _figures(samples: list[float]) -> dict[str, Any]:
    return {
        "median_s": round(statistics.median(samples), 4),
        "max_s": round(max(samples), 4),
        "samples": len(samples),
    }


def _bench_store(km: KMock, stages: Path, store: str, raw: str, runs: int, tag: str) -> Any:
    idle: list[float] = []
    failed: list[float] = []
    for i in range(runs):
        got = _one_run(km, stages, store, raw, f"bench-{tag}-{i}")
        idle += got["idle"]
        failed += got["failed"]
    return {"idle": _figures(idle), "failed": _figures(failed)}, idle + failed


def run() -> dict[str, Any]:
    runs = int(os.environ.get("HANDOFF_BENCH_RUNS", "4"))
    logs.configure(level="ERROR")
    results: dict[str, Any] = {}
    everything: list[float] = []
    with tempfile.TemporaryDirectory(prefix="handoff-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        raw = (tmp / "raw").as_uri()
        write_sample_data(open_store(raw), images=70, seed=0)
        stages = tmp / "stages.yaml"
        stages.write_text(
            yaml.safe_dump(
                {
                    "release": RELEASE,
                    "namespace": NAMESPACE,
                    "stages": {s.name: {"job": _stage_job(s.name)} for s in STAGES},
                }
            )
        )
        with KMock() as km:
            figures, samples = _bench_store(km, stages, (tmp / "store").as_uri(), raw, runs, "f")
            results["file_store"] = figures
            everything += samples
            try:
                s3 = s3server.start(tmp / "s3")
            except s3server.S3ServerError as exc:
                results["s3_store"] = f"skipped: SeaweedFS did not start ({str(exc)[:80]})"
            else:
                try:
                    with s3server.environment(s3.env()):
                        store = f"s3://{s3.bucket}/handoff"
                        figures, samples = _bench_store(km, stages, store, raw, runs, "s")
                        results["s3_store"] = figures
                        everything += samples
                finally:
                    s3.stop()
    headline = results.get("s3_store")
    if not isinstance(headline, dict):
        headline = results["file_store"]
    return {
        "handoff_latency_s": headline["idle"]["median_s"],
        "handoff_latency_max_s": round(max(everything), 4),
        "handoff_runs_per_store": runs,
        "handoff": results,
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
