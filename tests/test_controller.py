"""The Kubernetes controller against kmock, over HTTP, with the official client.

Stages are not run: a fake kubelet (tests/kmock_server.py) commits each stage's
manifest with the fingerprint the pipeline expects and moves the Job's status, or
fails / preempts / holds it by script. The store is a real FileStore.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml

from skinlesion import cli, config
from skinlesion.controller import run_controller
from skinlesion.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_STAGE_FAILED,
    ConfigError,
    InputError,
    RunCancelled,
    StageFailed,
)
from skinlesion.kube import Kube
from skinlesion.kube_executor import LOG_TAIL_LINES, KubernetesExecutor
from skinlesion.kube_jobs import (
    OomRetry,
    format_quantity,
    job_name,
    load_stages,
    parse_quantity,
    raised_memory_limit,
    run_id_from_job_name,
)
from skinlesion.layout import RunLayout
from skinlesion.lease import LeaseHeld, LeaseLost
from skinlesion.manifest import is_done
from skinlesion.pipeline import expected_fingerprint, plan
from skinlesion.stages import STAGE_BY_NAME, STAGES
from skinlesion.storage import get_json, open_store
from skinlesion.synthetic import write_sample_data
from tests import jobshape
from tests.kmock_server import FakeKubelet, KMock

pytestmark = pytest.mark.kube

NS = "retrain"
RELEASE = "sl"
RUN = "r1"
REPO = Path(__file__).resolve().parents[1]
ORDER = [s.name for s in STAGES]


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def km() -> Iterator[KMock]:
    with KMock() as server:
        yield server


@pytest.fixture(scope="session")
def raw_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny synthetic HAM10000 tree: only its fingerprint matters (stages are simulated)."""
    uri = tmp_path_factory.mktemp("raw").as_uri()
    write_sample_data(open_store(uri), images=70, seed=5, workers=1)
    return uri


def stage_job(stage: str) -> dict[str, Any]:
    return jobshape.stage_job(stage, NS, RELEASE)


@pytest.fixture
def stages_path(tmp_path: Path) -> Path:
    path = tmp_path / "stages.yaml"
    body = {
        "release": RELEASE,
        "namespace": NS,
        "store": (tmp_path / "store").as_uri(),
        "stages": {s: {"job": stage_job(s)} for s in ORDER},
    }
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.fixture
def store_uri(tmp_path: Path) -> str:
    return (tmp_path / "store").as_uri()


class Run:
    """One test's pieces: argv for the controller, the matching config and a kubelet."""

    def __init__(
        self,
        km: KMock,
        stages: Path,
        store: str,
        raw: str,
        tmp: Path,
        extra: list[str],
        run_id: str = RUN,
    ) -> None:
        self.km = km
        self.tmp = tmp
        self.argv = [
            "controller",
            "--stages",
            str(stages),
            "--store",
            store,
            "--raw",
            raw,
            "--run-id",
            run_id,
            "--preset",
            "tiny",
            "--lease-seconds",
            "2",
            *extra,
        ]
        args = self.args()
        self.cfg = config.load_pipeline(args.preset, args.config, args.set)
        self.layout = RunLayout(store, run_id)
        self.raw = raw

    def args(self) -> argparse.Namespace:
        return cli.build_parser().parse_args(self.argv)

    def kubelet(self, **script: list[str]) -> FakeKubelet:
        return FakeKubelet(self.km, NS, self.cfg, self.layout, self.raw, script=dict(script))

    def controller(self) -> int:
        """run_controller in this thread, with a client pointed at kmock."""
        return run_controller(self.cfg, self.args(), kube=Kube(self.km.configuration()))

    def main(self) -> int:
        """The whole CLI path (kubeconfig, error -> exit code), in this process."""
        kubeconfig = self.tmp / "kubeconfig"
        kubeconfig.write_text(self.km.kubeconfig(NS))
        previous = signal.getsignal(signal.SIGTERM)
        try:
            return cli.main([*self.argv, "--kubeconfig", str(kubeconfig)])
        finally:
            signal.signal(signal.SIGTERM, previous)

    def process(self) -> subprocess.Popen[bytes]:
        """The controller as its own process (for SIGKILL and SIGTERM)."""
        kubeconfig = self.tmp / "kubeconfig"
        kubeconfig.write_text(self.km.kubeconfig(NS))
        env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
        log = (self.tmp / "controller.log").open("ab")
        return subprocess.Popen(
            [sys.executable, "-m", "skinlesion", *self.argv, "--kubeconfig", str(kubeconfig)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )

    def log(self) -> str:
        path = self.tmp / "controller.log"
        return path.read_text() if path.exists() else ""


@pytest.fixture
def make_run(
    km: KMock, stages_path: Path, store_uri: str, raw_uri: str, tmp_path: Path
) -> Callable[..., Run]:
    def make(*extra: str) -> Run:
        return Run(km, stages_path, store_uri, raw_uri, tmp_path, list(extra))

    return make


class Background(threading.Thread):
    """Runs `fn` in a thread; `result()` returns its value or re-raises its exception."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.value: Any = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as exc:
            self.error = exc

    def result(self, timeout: float = 60) -> Any:
        self.join(timeout)
        assert not self.is_alive(), "controller did not finish"
        if self.error is not None:
            raise self.error
        return self.value


def names(*pairs: tuple[str, int]) -> list[str]:
    return [job_name(RELEASE, stage, RUN, attempt) for stage, attempt in pairs]


def created_jobs(km: KMock) -> list[str]:
    return [r.data["metadata"]["name"] for r in km.requests("POST", "jobs")]


def lease(km: KMock) -> dict[str, Any]:
    (obj,) = km.objects("coordination.k8s.io/v1/leases")
    return obj


def wait_until(predicate: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


# --- pure parts ---------------------------------------------------------------------------


def test_job_names_are_dns_labels_and_unique_per_attempt() -> None:
    assert job_name("sl", "train", "r1", 1) == "sl-train-r1"
    assert job_name("sl", "train", "r1", 3) == "sl-train-r1-a3"
    long = job_name("a-very-long-release-name-for-this-chart", "finetune", "x" * 40, 10)
    assert len(long) <= 63
    assert long.endswith("-finetune-" + "x" * 40 + "-a10")


def test_run_id_from_a_cronjob_job_name() -> None:
    assert run_id_from_job_name("sl-retrain-29384756", "sl") == "retrain-29384756"
    derived = run_id_from_job_name("Some_Very.Long-Controller-Job-Name-For-Testing-29384756")
    assert len(derived) <= 40
    assert derived != run_id_from_job_name(
        "Some_Very.Long-Controller-Job-Name-For-Testing-29384757"
    )


def test_stages_file_without_stage_container_is_refused(tmp_path: Path) -> None:
    job = stage_job("prepare")
    job["spec"]["template"]["spec"]["containers"][0]["name"] = "main"
    path = tmp_path / "stages.yaml"
    path.write_text(yaml.safe_dump({"release": RELEASE, "stages": {"prepare": {"job": job}}}))
    with pytest.raises(ConfigError, match="no container named 'stage'"):
        load_stages(str(path))


def test_memory_quantities_and_the_raised_limit() -> None:
    assert [parse_quantity(q) for q in ("8Gi", "512Mi", "1G", "1000", "1.5Gi")] == [
        8 * 2**30, 512 * 2**20, 10**9, 1000, 3 * 2**29,
    ]  # fmt: skip
    assert [format_quantity(n) for n in (16 * 2**30, 1536 * 2**20, 10**9)] == [
        "16Gi", "1536Mi", "954Mi",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="not a memory quantity"):
        parse_quantity("lots")
    gi = 2**30
    assert raised_memory_limit(8 * gi, OomRetry(2.0, 0), 8 * gi) == 16 * gi
    assert raised_memory_limit(16 * gi, OomRetry(2.0, 0), 8 * gi) == 32 * gi  # 4x the shape's
    assert raised_memory_limit(32 * gi, OomRetry(2.0, 0), 8 * gi) == 32 * gi
    assert raised_memory_limit(8 * gi, OomRetry(1.5, 10 * gi), 8 * gi) == 10 * gi


@pytest.mark.parametrize(
    ("retry", "error"),
    [
        ({"factor": 0.5}, r"oomRetry\.factor: must be a number in \[1, 16\]"),
        ({"factor": "x"}, r"oomRetry\.factor"),
        ({"maxMemory": "huge"}, r"stages\.prepare\.oomRetry\.maxMemory: not a memory quantity"),
    ],
)
def test_a_bad_oom_retry_in_the_stages_file_is_named(
    tmp_path: Path, retry: dict[str, Any], error: str
) -> None:
    path = tmp_path / "stages.yaml"
    entry = {"job": stage_job("prepare"), "oomRetry": retry}
    path.write_text(yaml.safe_dump({"release": RELEASE, "stages": {"prepare": entry}}))
    with pytest.raises(ConfigError, match=error):
        load_stages(str(path))


def test_build_job_names_labels_and_args_without_touching_the_shape(
    stages_path: Path, store_uri: str, raw_uri: str
) -> None:
    stages = load_stages(str(stages_path))
    executor = KubernetesExecutor(Kube(config_host()), stages, NS, RELEASE)
    call = plan(config.load_pipeline("tiny"), RunLayout(store_uri, RUN), raw_uri)[2]
    job = executor.build_job(call, RUN, 2)
    assert job["metadata"]["name"] == "sl-train-r1-a2"
    assert job["metadata"]["namespace"] == NS
    want = {
        "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/component": "train",
        "skinlesion.io/run-id": RUN,
        "skinlesion.io/attempt": "2",
    }
    for labels in (job["metadata"]["labels"], job["spec"]["template"]["metadata"]["labels"]):
        assert want.items() <= labels.items()
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"] == [*call.argv[1:], "--run-id", RUN]
    assert container["args"][:2] == ["--phase", "top"]
    assert "args" not in stages.jobs["train"]["spec"]["template"]["spec"]["containers"][0]
    assert "name" not in stages.jobs["train"]["metadata"]


def config_host() -> Any:
    from kubernetes import client

    return client.Configuration(host="http://127.0.0.1:9")


# --- runs against kmock -------------------------------------------------------------------


def test_full_run_creates_one_job_per_stage_in_order(make_run: Callable[..., Run]) -> None:
    run = make_run()
    with run.kubelet() as kubelet:
        assert run.controller() == 0
    assert kubelet.names() == names(*((s, 1) for s in ORDER))
    assert created_jobs(run.km) == kubelet.names()
    for stage, job in zip(ORDER, kubelet.jobs, strict=True):
        meta = job["metadata"]
        assert meta["namespace"] == NS
        assert meta["labels"]["app.kubernetes.io/component"] == stage
        assert meta["labels"]["skinlesion.io/run-id"] == RUN
        assert meta["labels"]["skinlesion.io/attempt"] == "1"
        spec = job["spec"]
        assert spec["podFailurePolicy"]["rules"][0]["action"] == "Ignore"  # the shape, kept
        (container,) = spec["template"]["spec"]["containers"]
        assert container["command"] == ["python", f"/app/jobs/{STAGE_BY_NAME[stage].job}.py"]
        assert container["args"][-2:] == ["--run-id", RUN]  # full argv checked by the kubelet
    # each Job is created only after the previous one finished, and quickly
    created = {name: t for plural, name, t in run.km.created_at if plural == "jobs"}
    for prev, nxt in zip(kubelet.names(), kubelet.names()[1:], strict=False):
        handoff = created[nxt] - kubelet.finished_at[prev]
        assert 0 < handoff < 2.0, (prev, nxt, handoff)
    # the Lease was held, then released (no holder) with resourceVersion CAS
    assert "holderIdentity" not in lease(run.km)["spec"]
    assert len(run.km.requests("PUT", "leases")) >= 1


def test_expired_watch_is_listed_again_and_the_run_goes_on(make_run: Callable[..., Run]) -> None:
    run = make_run()
    run.km.expire_watches = 1
    with run.kubelet(prepare=["hold"]) as kubelet:
        first = Background(run.controller)
        kubelet.wait_for(lambda: len(kubelet.jobs) == 1)
        prepare = f"metadata.name={names(('prepare', 1))[0]}"

        def requests() -> list[Any]:
            return [
                r
                for r in run.km.requests("GET", "jobs")
                if r.params.get("fieldSelector") == prepare
            ]

        wait_until(lambda: sum(r.params.get("watch") == "true" for r in requests()) == 2)
        kubelet.finish(names(("prepare", 1))[0])
        assert first.result() == 0
    mine = requests()
    kinds = ["watch" if r.params.get("watch") == "true" else "list" for r in mine]
    expired = next(i for i, r in enumerate(mine) if kinds[i] == "watch")
    assert mine[expired].params.get("resourceVersion")  # answered 410 Expired
    assert kinds[expired + 1 : expired + 3] == ["list", "watch"]  # list again, watch again
    assert len(kubelet.jobs) == len(ORDER)


def test_cronjob_run_id_comes_from_the_controllers_own_job_name(
    km: KMock, stages_path: Path, store_uri: str, raw_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SKINLESION_JOB_NAME", f"{RELEASE}-retrain-29384756")
    argv = ["controller", "--stages", str(stages_path), "--raw", raw_uri, "--preset", "tiny"]
    args = cli.build_parser().parse_args([*argv, "--run-id-from-job"])
    cfg = config.load_pipeline("tiny")
    layout = RunLayout(store_uri, "retrain-29384756")  # store: from the stages file
    with FakeKubelet(km, NS, cfg, layout, raw_uri) as kubelet:
        assert run_controller(cfg, args, kube=Kube(km.configuration())) == 0
    assert kubelet.names()[0] == f"{RELEASE}-prepare-retrain-29384756"
    monkeypatch.delenv("SKINLESION_JOB_NAME")
    with pytest.raises(InputError, match="SKINLESION_JOB_NAME"):
        run_controller(cfg, args, kube=Kube(km.configuration()))


def test_rerun_of_a_finished_run_creates_no_job(make_run: Callable[..., Run]) -> None:
    run = make_run()
    with run.kubelet():
        assert run.controller() == 0
    before = created_jobs(run.km)
    with run.kubelet() as again:
        assert run.controller() == 0
    assert created_jobs(run.km) == before
    assert again.jobs == []


def test_failing_stage_is_retried_its_log_saved_then_named(
    make_run: Callable[..., Run], capsys: pytest.CaptureFixture[str]
) -> None:
    run = make_run("--set", "retries=1")
    with run.kubelet(augment=["fail:1", "fail:1"]) as kubelet:
        code = run.main()
    assert code == EXIT_STAGE_FAILED  # its podFailurePolicy fails the controller Job
    assert "stage 'augment' failed" in capsys.readouterr().err
    assert kubelet.names() == names(("prepare", 1), ("augment", 1), ("augment", 2))
    logs = open_store(run.layout.logs_uri)
    for attempt in (1, 2):
        text = logs.get_bytes(f"augment-attempt-{attempt}.log").decode()
        assert text.rstrip().endswith("augment: error: exit 1")
        assert len(text.splitlines()) == LOG_TAIL_LINES  # a tail, not the whole log


def test_bad_input_exit_code_2_fails_fast_without_retry(make_run: Callable[..., Run]) -> None:
    run = make_run("--set", "retries=3")
    with run.kubelet(prepare=["fail:2"]) as kubelet:
        assert run.main() == EXIT_BAD_INPUT
    assert kubelet.names() == names(("prepare", 1))


def test_preemption_is_retried_without_counting_as_failure(make_run: Callable[..., Run]) -> None:
    run = make_run("--set", "retries=0")
    # train: two disrupted pods surface as failed Jobs; augment: the Job's podFailurePolicy
    # replaced the evicted pod itself, so the controller only sees the Job complete.
    with run.kubelet(train=["preempt", "preempt"], augment=["evict-then-ok"]) as kubelet:
        assert run.controller() == 0
    assert [n for n in kubelet.names() if "-train-" in n] == names(
        ("train", 1), ("train", 2), ("train", 3)
    )
    assert [n for n in kubelet.names() if "-augment-" in n] == names(("augment", 1))
    logs = open_store(run.layout.logs_uri)
    assert logs.get_bytes("train-attempt-1.log").decode() == "node lost\n"


def _limits(km: KMock, stage: str) -> list[str]:
    """The stage container's memory limit of each Job of `stage`, in creation order."""
    return [
        r.data["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
        for r in km.requests("POST", "jobs")
        if r.data["metadata"]["labels"]["app.kubernetes.io/component"] == stage
    ]


def test_oom_killed_stage_is_named_and_retried_with_more_memory_up_to_the_cap(
    km: KMock, stages_path: Path, store_uri: str, raw_uri: str, tmp_path: Path
) -> None:
    body = yaml.safe_load(stages_path.read_text())
    body["stages"]["augment"]["job"]["spec"]["template"]["spec"]["containers"][0]["resources"][
        "limits"
    ] = {"memory": "1Gi"}
    body["stages"]["augment"]["oomRetry"] = {"factor": 2, "maxMemory": "3Gi"}
    stages_path.write_text(yaml.safe_dump(body))
    run = Run(km, stages_path, store_uri, raw_uri, tmp_path, ["--set", "retries=3"])
    with structlog.testing.capture_logs() as events, run.kubelet(augment=["oom", "oom", "oom"]):
        assert run.controller() == 0
    assert _limits(km, "augment") == ["1Gi", "2Gi", "3Gi", "3Gi"]  # x2, then capped
    ooms = [e for e in events if e["event"] == "stage_oom_killed"]
    assert [e["memory_limit"] for e in ooms] == ["1Gi", "2Gi", "3Gi"]
    assert ooms[0]["message"] == (
        "stage augment ran out of memory (OOMKilled at limit 1Gi): the next attempt gets 2Gi"
    )
    assert "at the cap (stages.augment.oomRetry.maxMemory)" in ooms[-1]["message"]
    failed = [e for e in events if e["event"] == "job_failed"]
    assert all(e["reason"].startswith("OOMKilled at memory limit") for e in failed)


def test_stage_failure_is_an_error_naming_the_stage(make_run: Callable[..., Run]) -> None:
    run = make_run("--set", "retries=0")
    with run.kubelet(evaluate=["fail:1"]), pytest.raises(StageFailed, match="'evaluate'") as info:
        run.controller()
    # the controller Job's podFailurePolicy fails it at once on this code (test_chart.py):
    # a restarted controller pod would spend a whole new retry budget on the stage
    assert info.value.exit_code == EXIT_STAGE_FAILED


def test_rerun_after_a_failed_run_tries_again_with_the_next_attempt(
    make_run: Callable[..., Run],
) -> None:
    """Jobs that ended before the controller started are history, not results."""
    run = make_run("--set", "retries=0")
    with run.kubelet(prepare=["fail:1"]), pytest.raises(StageFailed, match="'prepare'"):
        run.controller()
    with run.kubelet() as kubelet:  # the failed Job is still there (until its TTL)
        assert run.controller() == 0
    assert kubelet.names()[0] == names(("prepare", 2))[0]
    assert created_jobs(run.km).count(names(("prepare", 1))[0]) == 1


def test_second_controller_is_refused_by_the_lease(make_run: Callable[..., Run]) -> None:
    run = make_run("--lease-seconds", "30")
    with run.kubelet(prepare=["hold"]) as kubelet:
        first = Background(run.controller)
        kubelet.wait_for(lambda: len(kubelet.jobs) == 1)
        start = time.monotonic()
        with pytest.raises(LeaseHeld, match="refusing to start a second controller"):
            run.controller()
        # Refused on a renewal seen within one lease duration (renewed every third of it),
        # never by waiting for the Lease to expire; no tighter bound: a busy machine is slow.
        assert time.monotonic() - start < 30.0
        assert created_jobs(run.km) == names(("prepare", 1))
        kubelet.finish(names(("prepare", 1))[0])
        assert first.result() == 0
    assert len(kubelet.jobs) == len(ORDER)


def test_cancel_deletes_the_runs_jobs_marks_the_run_and_a_rerun_resumes(
    make_run: Callable[..., Run], capsys: pytest.CaptureFixture[str]
) -> None:
    run = make_run("--set", "retries=3")
    kubeconfig = run.tmp / "kubeconfig"
    kubeconfig.write_text(run.km.kubeconfig(NS))
    train = names(("train", 1))[0]
    cancel_argv = ["cancel", "--store", run.layout.store_uri, "--run-id", RUN]
    cancel_argv += ["--namespace", NS, "--release", RELEASE, "--kubeconfig", str(kubeconfig)]
    with run.kubelet(train=["hold"]) as kubelet:
        first = Background(run.controller)
        kubelet.wait_for(lambda: train in kubelet.names(), timeout=60)
        assert cli.main(cancel_argv) == 0
        with pytest.raises(RunCancelled, match=f"run '{RUN}' was cancelled .*rerun"):
            first.result()
    # Every Job of the run (prepare's and augment's finished ones too), pods with them.
    assert "cancelled (3 Jobs deleted)" in capsys.readouterr().out
    deletes = run.km.requests("DELETE", "jobs")
    assert [d.params.get("propagationPolicy") for d in deletes] == ["Background"] * 3
    assert not any(j["metadata"]["name"] == train for j in run.km.objects("jobs"))
    assert created_jobs(run.km).count(train) == 1  # not retried after the cancel
    run_store = open_store(run.layout.run_uri)
    assert get_json(run_store, "cancelled.json")["run_id"] == RUN
    before = created_jobs(run.km)
    with run.kubelet() as again:
        assert run.controller() == 0
    assert not run_store.exists("cancelled.json")
    resumed = created_jobs(run.km)[len(before) :]
    assert resumed[0] == names(("train", 2))[0]  # prepare and augment were not redone
    assert len(again.jobs) == len(ORDER) - 2


def test_controller_killed_mid_stage_is_restarted_and_adopts_the_job(
    make_run: Callable[..., Run],
) -> None:
    run = make_run()
    with run.kubelet(train=["hold"]) as kubelet:
        proc = run.process()
        try:
            kubelet.wait_for(lambda: any("-train-" in n for n in kubelet.names()), timeout=60)
        finally:
            proc.kill()  # SIGKILL: no cleanup, the Lease stays held until it expires
            proc.wait(10)
        train = names(("train", 1))[0]
        restarted = Background(run.controller)
        # The restarted controller waits out the dead holder's Lease, then adopts.
        wait_until(lambda: (lease(run.km)["spec"].get("leaseTransitions") or 0) >= 1)
        time.sleep(0.3)
        kubelet.finish(train)
        assert restarted.result() == 0
    assert created_jobs(run.km).count(train) == 1
    assert kubelet.names() == names(*((s, 1) for s in ORDER))


def test_controller_restarted_after_a_failed_attempt_keeps_that_attempts_log(
    make_run: Callable[..., Run],
) -> None:
    """The restarted controller adopts attempt 2 and saves its log as attempt 2: the log of
    attempt 1 (saved by the killed controller) is not overwritten."""
    run = make_run("--set", "retries=1")
    prepare = names(("prepare", 1), ("prepare", 2), ("prepare", 3))
    watch_second = f"metadata.name={prepare[1]}"

    def watches() -> int:
        return sum(
            r.params.get("watch") == "true" and r.params.get("fieldSelector") == watch_second
            for r in run.km.requests("GET", "jobs")
        )

    with run.kubelet(prepare=["fail:1", "hold"]) as kubelet:
        proc = run.process()
        try:
            # Attempt 1 failed and its log was saved before attempt 2 was created.
            kubelet.wait_for(lambda: len(kubelet.jobs) == 2, timeout=60)
        finally:
            proc.kill()
            proc.wait(10)
        before = watches()
        restarted = Background(run.controller)
        wait_until(lambda: watches() > before)  # adopted: it watches attempt 2
        kubelet.finish(prepare[1], "fail:137")
        assert restarted.result() == 0  # its own retry: attempt 3 succeeds
    assert kubelet.names()[:3] == prepare
    assert [created_jobs(run.km).count(n) for n in prepare] == [1, 1, 1]
    logs = open_store(run.layout.logs_uri)
    first, second = (logs.get_bytes(f"prepare-attempt-{n}.log").decode() for n in (1, 2))
    assert first.rstrip().endswith("prepare: error: exit 1")
    assert second.rstrip().endswith("prepare: error: exit 137")
    assert first != second
    assert not logs.exists("prepare-attempt-3.log")


def test_sigterm_deletes_the_running_job_and_exits_143(make_run: Callable[..., Run]) -> None:
    run = make_run()
    with run.kubelet(prepare=["hold"]) as kubelet:
        proc = run.process()
        try:
            kubelet.wait_for(lambda: len(kubelet.jobs) == 1, timeout=60)
            time.sleep(0.3)  # let it reach the watch
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == EXIT_INTERRUPTED, run.log()
        finally:
            proc.kill()
    prepare = names(("prepare", 1))[0]
    deletes = [r for r in run.km.requests("DELETE", "jobs") if r.name == prepare]
    assert len(deletes) == 1
    assert deletes[0].params.get("propagationPolicy") == "Background"
    assert run.km.objects("batch/v1/jobs") == []
    assert "holderIdentity" not in lease(run.km)["spec"]  # released on the way out


def test_job_without_result_in_max_wait_is_deleted_and_retried(
    make_run: Callable[..., Run],
) -> None:
    run = make_run("--max-wait-s", "1", "--set", "retries=1")
    with run.kubelet(prepare=["hold", "ok"]) as kubelet:
        assert run.controller() == 0
    first, second = names(("prepare", 1), ("prepare", 2))
    assert kubelet.names()[:2] == [first, second]
    deleted = [r.name for r in run.km.requests("DELETE", "jobs")]
    assert deleted == [first]


def test_controller_that_loses_its_lease_stops_without_touching_the_job(
    make_run: Callable[..., Run],
) -> None:
    from kubernetes import client

    run = make_run()
    with run.kubelet(prepare=["hold"]) as kubelet:
        first = Background(run.controller)
        kubelet.wait_for(lambda: len(kubelet.jobs) == 1)
        # Someone else takes the Lease over (a CAS write with the current version).
        api = client.CoordinationV1Api(client.ApiClient(run.km.configuration()))
        current = lease(run.km)
        current["spec"]["holderIdentity"] = "someone-else"
        api.replace_namespaced_lease(current["metadata"]["name"], NS, current)  # type: ignore[arg-type]
        with pytest.raises(LeaseLost):
            first.result(timeout=10)
    assert run.km.requests("DELETE", "jobs") == []
    assert lease(run.km)["spec"]["holderIdentity"] == "someone-else"


def test_the_charts_own_controller_job_drives_a_run(
    km: KMock, tmp_path: Path, raw_uri: str
) -> None:
    """Contract with the Helm chart: its controller args and mounted files, as rendered."""
    from tests import chart_render

    rendered = chart_render.render()
    (job,) = [j for j in rendered.kind("Job") if j["metadata"]["name"].endswith("-run-rev-1")]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python", "/app/jobs/controller.py"]
    mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "config")
    etc = tmp_path / "etc"
    etc.mkdir()
    for key, text in rendered.stages_configmap["data"].items():
        (etc / key).write_text(text)
    store = (tmp_path / "store").as_uri()
    replace = {"--store": store, "--raw": raw_uri}  # the chart's s3:// store, here a file store
    args = [a.replace(mount, str(etc)) for a in container["args"]]
    for flag, value in replace.items():
        args[args.index(flag) + 1] = value
    kubeconfig = tmp_path / "kubeconfig"
    namespace = rendered.stages["namespace"]
    kubeconfig.write_text(km.kubeconfig(namespace))
    argv = ["controller", *args, "--kubeconfig", str(kubeconfig)]  # as jobs/controller.py

    parsed = cli.build_parser().parse_args(argv)
    cfg = config.load_pipeline(parsed.preset, parsed.config, parsed.set)
    layout = RunLayout(store, parsed.run_id)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with FakeKubelet(km, namespace, cfg, layout, raw_uri) as kubelet:
            assert cli.main(argv) == 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    release = rendered.stages["release"]
    assert kubelet.names() == [f"{release}-{s}-{parsed.run_id}" for s in ORDER]
    shapes = rendered.stage_jobs()
    for stage, created in zip(ORDER, kubelet.jobs, strict=True):
        want = shapes[stage]["spec"]["template"]["spec"]["containers"][0]
        got = created["spec"]["template"]["spec"]["containers"][0]
        assert got["command"] == want["command"]
        assert got["resources"] == want["resources"]  # e.g. `nvidia.com/gpu: 1` sent as is
        assert created["spec"]["podFailurePolicy"] == shapes[stage]["spec"]["podFailurePolicy"]


# --- load ---------------------------------------------------------------------------------

LOAD_RUNS = 20


@pytest.mark.soak  # about 4 s of the emulator's CPU per run: `make soak`
def test_concurrent_runs_get_their_own_jobs_and_results(
    km: KMock, stages_path: Path, store_uri: str, raw_uri: str, tmp_path: Path
) -> None:
    """LOAD_RUNS controllers with distinct run ids at once, one store, one namespace: each
    run gets exactly its six Jobs (each kubelet checks every Job's argv against its own
    run's plan), commits all its stages, and releases its own Lease."""
    ids = [f"load-{i:02d}" for i in range(LOAD_RUNS)]
    runs = {
        rid: Run(km, stages_path, store_uri, raw_uri, tmp_path, ["--lease-seconds", "6"], rid)
        for rid in ids
    }
    kubelets = {rid: run.kubelet() for rid, run in runs.items()}
    for kubelet in kubelets.values():
        kubelet.__enter__()
    try:
        barrier = threading.Barrier(LOAD_RUNS)

        def drive(run: Run) -> int:
            barrier.wait()
            return run.controller()

        controllers = {rid: Background(lambda run=run: drive(run)) for rid, run in runs.items()}
        for rid, controller in controllers.items():
            assert controller.result(timeout=600) == 0, rid
    finally:
        for kubelet in kubelets.values():
            kubelet.__exit__(None, None, None)
    created = created_jobs(km)
    assert len(created) == len(set(created)) == LOAD_RUNS * len(ORDER)  # no duplicate Job
    for rid, run in runs.items():
        want = [job_name(RELEASE, stage, rid, 1) for stage in ORDER]
        assert kubelets[rid].names() == want, rid  # its own Jobs, in order, no other's
        for call in plan(run.cfg, run.layout, raw_uri):  # no lost result
            out = open_store(call.out_uri)
            assert is_done(out, expected_fingerprint(call)), (rid, call.stage.name)
            assert out.get_bytes("output.txt") == f"{call.stage.name} of {rid}\n".encode()
    leases = {o["metadata"]["name"]: o for o in km.objects("coordination.k8s.io/v1/leases")}
    assert set(leases) == {f"{RELEASE}-{rid}" for rid in ids}
    assert all("holderIdentity" not in lease["spec"] for lease in leases.values())


def test_two_controllers_started_at_once_for_one_run_exactly_one_runs(
    make_run: Callable[..., Run],
) -> None:
    """Both start together: one creates the run's Lease and its Jobs, the other sees the
    Lease renewed and is refused; every stage's Job is created once."""
    run = make_run("--lease-seconds", "6")
    barrier = threading.Barrier(2)

    def start() -> int:
        barrier.wait()
        return run.controller()

    with run.kubelet(prepare=["hold"]) as kubelet:
        pair = [Background(start), Background(start)]
        kubelet.wait_for(lambda: len(kubelet.jobs) == 1)
        wait_until(lambda: any(not c.is_alive() for c in pair), timeout=60)
        (loser,) = [c for c in pair if not c.is_alive()]
        (winner,) = [c for c in pair if c is not loser]
        with pytest.raises(LeaseHeld, match="refusing to start a second controller"):
            loser.result()
        kubelet.finish(names(("prepare", 1))[0])
        assert winner.result(timeout=120) == 0
    assert created_jobs(run.km) == names(*((s, 1) for s in ORDER))
    assert "holderIdentity" not in lease(run.km)["spec"]
