"""The chart's pods run for real: its Jobs as containers of the built image, no cluster.

The chart is rendered with the kind values (values-kind.yaml: the Makefile's `kind-up` /
`kind-test` shapes) with the in-chart MinIO swapped for the session's SeaweedFS server and
the `tiny` preset; its objects are installed in the API emulator in Helm's order (the
credentials Secret first, as `make kind-up` creates it). tests/docker_kubelet.py then runs
every Job's pod spec with `docker run`: the controller Job's pod talks to the emulator over
HTTPS with its mounted ServiceAccount token (RBAC from the chart's Role enforced), creates
the stage Jobs, and each stage runs in its own container against SeaweedFS.

Scenarios (each one controller run; `pytest -m pods` runs these and the kubelet's own tests,
tests/test_docker_kubelet.py):
- a whole run that loses the node under the training pod after its first epoch: the run
  finishes, every stage its own container, the metrics in the store, the champion promoted
  (test 1), and the lost pod is replaced inside its Job and training resumes (test 2); its
  containers report to the session's Pushgateway and MLflow server;
- bad input in a scheduled run (a Job made from the chart's CronJob, as the CronJob
  controller makes it: the run id derived from its name): prepare exits 2, its Job fails at
  once by its podFailurePolicy, the run ends with exit 2, nothing is retried (test 3);
- too little memory: prepare is OOM-killed, reported as such, and retried with the limit
  raised (test 4); then the controller Job is deleted and takes its stage Job with it.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from mlflow import MlflowClient

from skinlesion.kube_jobs import job_name, job_state
from skinlesion.layout import RunLayout
from skinlesion.obs import mlflow_log
from skinlesion.stages import STAGES
from skinlesion.storage import get_json, open_store
from skinlesion.synthetic import write_sample_data
from skinlesion.train_state import STATE_JSON
from tests import chart_render as cr
from tests.cluster_auth import ClusterAuth
from tests.docker_engine import Built
from tests.docker_kubelet import DockerKubelet, PodRecord
from tests.kmock_server import KMock
from tests.s3server import S3Server

pytestmark = [pytest.mark.pods, pytest.mark.slow]

NS = "skinlesion"
RELEASE = "skinlesion"
ORDER = [s.name for s in STAGES]
KIND_VALUES = cr.CHART / "values-kind.yaml"
SECRET = cr.read_values(KIND_VALUES)["store"]["existingSecret"]
RUN_TIMEOUT_S = 900  # a hang guard for a whole tiny run in containers on a busy machine
# Helm's install order for the kinds the chart renders.
INSTALL_ORDER = ["NetworkPolicy", "ServiceAccount", "Secret", "ConfigMap", "Role", "RoleBinding",
                 "Job", "CronJob"]  # fmt: skip


# --- installing the chart in the emulator ---------------------------------------------------


def api_path(obj: dict[str, Any]) -> str:
    group_version = obj["apiVersion"]
    base = f"/api/{group_version}" if "/" not in group_version else f"/apis/{group_version}"
    plural = "networkpolicies" if obj["kind"] == "NetworkPolicy" else obj["kind"].lower() + "s"
    return f"{base}/namespaces/{NS}/{plural}"


def create(km: KMock, obj: dict[str, Any]) -> None:
    """POST one object as is (what `helm install` / `kubectl create` send)."""
    obj = {**obj, "metadata": {**obj["metadata"], "namespace": NS}}
    api = client.ApiClient(km.configuration())
    response = api.call_api(
        "POST",
        km.url + api_path(obj),
        header_params={"Content-Type": "application/json", "Accept": "application/json"},
        body=obj,
    )
    assert response.status in (200, 201), (response.status, response.read())


@dataclass
class Release:
    run_id: str
    store: str  # s3://bucket/prefix
    rendered: cr.Rendered
    controller_job: str

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.store, self.run_id)

    def stage_job(self, stage: str, attempt: int = 1) -> str:
        return job_name(RELEASE, stage, self.run_id, attempt)


def install(
    km: KMock,
    image: Built,
    s3: S3Server,
    raw: str,
    values: dict[str, Any] | None = None,
    scheduled: bool = False,
) -> Release:
    """The chart (kind values, SeaweedFS as the store, tiny preset) and its Secret, installed;
    its run started by its one-off controller Job, or (`scheduled`) by a Job the CronJob
    controller creates from the chart's CronJob at a schedule time."""
    repository, tag = image.name.split(":")
    prefix = f"pods/{uuid.uuid4().hex[:8]}"
    run_id = "p" + uuid.uuid4().hex[:8]
    overrides = cr.deep_merge(
        {
            "image": {"repository": repository, "tag": tag},
            "store": {"endpoint": s3.endpoint, "bucket": s3.bucket, "prefix": prefix, "raw": raw,
                      "region": s3.region},
            "minio": {"enabled": False},
            "run": {"enabled": not scheduled, "id": run_id},
            "schedule": {"enabled": scheduled},
            "pipeline": {"preset": "tiny"},
        },
        values or {},
    )  # fmt: skip
    rendered = cr.render([KIND_VALUES], overrides, release=RELEASE, namespace=NS)
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": SECRET, "namespace": NS},
        "type": "Opaque",
        "data": {
            k: base64.b64encode(v.encode()).decode()
            for k, v in (("AWS_ACCESS_KEY_ID", s3.access_key),
                         ("AWS_SECRET_ACCESS_KEY", s3.secret_key))
        },
    }  # fmt: skip
    objects = [secret, *rendered.objects]
    for obj in sorted(objects, key=lambda o: INSTALL_ORDER.index(o["kind"])):
        cr.validate(obj, cr.KUBE_VERSIONS[-1])  # as the API server would, strictly
        create(km, obj)
    if not scheduled:
        (controller,) = rendered.kind("Job")
        return Release(
            run_id, f"s3://{s3.bucket}/{prefix}", rendered, controller["metadata"]["name"]
        )
    # What the CronJob controller creates: <cronjob>-<schedule time in minutes>, from the
    # jobTemplate, owned by the CronJob.
    cronjob = rendered.one("CronJob")
    template = cronjob["spec"]["jobTemplate"]
    name = f"{cronjob['metadata']['name']}-{int(time.time() // 60)}"
    create(km, {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "labels": template["metadata"]["labels"],
            "annotations": {"batch.kubernetes.io/cronjob-scheduled-timestamp": "now"},
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "CronJob", "controller": True,
                                 "name": cronjob["metadata"]["name"], "uid": "cronjob-uid"}],
        },
        "spec": template["spec"],
    })  # fmt: skip
    return Release(name.removeprefix(f"{RELEASE}-"), f"s3://{s3.bucket}/{prefix}", rendered, name)


def job(km: KMock, name: str) -> dict[str, Any] | None:
    found = [j for j in km.objects("batch/v1/jobs") if j["metadata"]["name"] == name]
    return found[0] if found else None


def stage_jobs(km: KMock, release: Release) -> list[str]:
    return [r.data["metadata"]["name"] for r in km.requests("POST", "jobs")
            if r.data["metadata"]["name"] != release.controller_job]  # fmt: skip


def wait_job_end(kubelet: DockerKubelet, km: KMock, name: str, timeout: float) -> dict[str, Any]:
    kubelet.wait_for(lambda: job_state(job(km, name) or {}) is not None, timeout, f"Job {name}")
    found = job(km, name)
    assert found is not None
    return found


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond["type"] == kind and cond["status"] == "True":
            return dict(cond)
    return {}


def events(log: str, name: str) -> list[dict[str, Any]]:
    """The JSON log lines with this event name (what a stage prints in a pod)."""
    found = []
    for line in log.splitlines():
        if line.startswith("{") and f'"{name}"' in line:
            entry = json.loads(line)
            if entry.get("event") == name:
                found.append(entry)
    return found


def pods_of(kubelet: DockerKubelet, job_name_: str) -> list[PodRecord]:
    return [p for p in kubelet.pods if p.job == job_name_]


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_data(s3_server: S3Server) -> str:
    """A tiny synthetic HAM10000 tree in SeaweedFS (shared by the runs; read only)."""
    uri = f"s3://{s3_server.bucket}/pods-raw-{uuid.uuid4().hex[:8]}/HAM10000"
    write_sample_data(open_store(uri), images=70, seed=5, workers=1)
    return uri


@dataclass
class Cluster:
    km: KMock
    auth: ClusterAuth
    kubelet: DockerKubelet


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with KMock() as km:
        auth = ClusterAuth(km, tmp_path / "apiserver")
        with DockerKubelet(km, auth, NS, tmp_path / "pods") as kubelet:
            yield Cluster(km, auth, kubelet)
        assert auth.denied == []  # every request of the controller passed the chart's Role


# --- 1 and 2: a whole run, a node lost under training ----------------------------------------


@dataclass
class FinishedRun:
    release: Release
    km: KMock
    auth: ClusterAuth
    kubelet: DockerKubelet
    controller: dict[str, Any]
    lost_pod: str


@pytest.fixture(scope="module")
def finished_run(
    built_image: Built,
    s3_server: S3Server,
    raw_data: str,
    pushgateway_url: str,
    mlflow_uri: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[FinishedRun]:
    """The chart installed (reporting to the session's Pushgateway and MLflow server), its
    controller Job run to the end; the node under the training pod lost once its first epoch
    is backed up (state.json in the store)."""
    tmp = tmp_path_factory.mktemp("pods-run")
    tag = uuid.uuid4().hex[:8]
    observability = {
        "metrics": {"pushgateway": {"url": pushgateway_url}},
        "mlflow": {"trackingUri": mlflow_uri, "experiment": f"pods-{tag}",
                   "registeredModel": f"pods-{tag}"},
    }  # fmt: skip
    with KMock() as km:
        auth = ClusterAuth(km, tmp / "apiserver")
        with DockerKubelet(km, auth, NS, tmp / "pods") as kubelet:
            release = install(km, built_image, s3_server, raw_data, observability)
            train = release.stage_job("train")
            kubelet.wait_for(lambda: kubelet.running(train) is not None, RUN_TIMEOUT_S, train)
            pod = kubelet.running(train)
            assert pod is not None
            state = open_store(release.layout.stage_uri("train"))
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while not (state.exists(STATE_JSON) and get_json(state, STATE_JSON)["epochs_done"]):
                assert pod.exit_code is None, f"training ended before its first backup: {pod}"
                assert time.monotonic() < deadline, "no training backup in time"
                time.sleep(0.2)
            kubelet.lose_node(pod.name)
            controller = wait_job_end(kubelet, km, release.controller_job, RUN_TIMEOUT_S)
            yield FinishedRun(release, km, auth, kubelet, controller, pod.name)


def test_the_charts_run_finishes_with_every_stage_in_its_own_container(
    finished_run: FinishedRun,
) -> None:
    run, km, kubelet = finished_run.release, finished_run.km, finished_run.kubelet
    (controller_pod,) = pods_of(kubelet, run.controller_job)
    assert condition(finished_run.controller, "Complete"), controller_pod.log[-3000:]
    assert controller_pod.exit_code == 0
    assert events(controller_pod.log, "controller_done")
    # one Job per stage, in order, each Complete; each pod its own container of the image
    assert stage_jobs(km, run) == [run.stage_job(s) for s in ORDER]
    containers = set()
    for stage in ORDER:
        name = run.stage_job(stage)
        assert condition(job(km, name) or {}, "Complete"), name
        pods = pods_of(kubelet, name)
        assert pods[-1].exit_code == 0 and pods[-1].reason == "Completed", pods[-1].log[-2000:]
        containers |= {p.container for p in pods}
        args = pods[-1].docker_args
        # the shape the chart renders, as the container got it
        assert {"--read-only", "--network"} <= set(args)
        assert args[args.index("--user") + 1] == "10001:10001"
        assert args[args.index("--cap-drop") + 1] == "ALL"
        assert "no-new-privileges" in args and "seccomp=unconfined" not in args
        limits = run.rendered.stage_jobs()[stage]["spec"]["template"]["spec"]["containers"][0]
        assert pods[-1].memory_limit == limits["resources"]["limits"]["memory"]
        assert not any(a.endswith(":/var/run/secrets/kubernetes.io/serviceaccount:ro")
                       for a in args), "a stage pod got an API token"  # fmt: skip
    assert len(containers) == len(ORDER) + 1  # train's lost pod and its replacement
    controller_args = controller_pod.docker_args
    assert any(a.endswith(":/var/run/secrets/kubernetes.io/serviceaccount:ro")
               for a in controller_args)  # fmt: skip
    # the controller reached the API only through the chart's Role
    assert finished_run.auth.denied == []
    verbs = {a.split(" ", 1)[1] for a in finished_run.auth.allowed}
    assert {"create batch/jobs", "watch batch/jobs", "update coordination.k8s.io/leases"} <= verbs
    # what the run left in the store
    layout = run.layout
    for stage in ORDER:
        assert open_store(layout.stage_uri(stage)).exists("manifest.json"), stage
    metrics = get_json(open_store(layout.stage_uri("evaluate")), "metrics.json")
    assert 0.0 <= metrics["balanced_accuracy"] <= 1.0 and metrics["n_images"] > 0
    models = open_store(f"{run.store}/models")
    registry = get_json(models, "registry.json")
    champion = registry["aliases"]["champion"]
    (version,) = [v for v in registry["versions"] if v["version"] == champion]
    assert version["run_id"] == run.run_id
    assert get_json(models, "latest/manifest.json")["version"] == champion


def test_a_node_lost_under_training_is_replaced_and_training_resumes(
    finished_run: FinishedRun,
) -> None:
    run, km, kubelet = finished_run.release, finished_run.km, finished_run.kubelet
    train = run.stage_job("train")
    lost, replacement = pods_of(kubelet, train)
    assert lost.name == finished_run.lost_pod and lost.lost
    assert lost.reason == "ContainerStatusUnknown" and lost.exit_code == 137
    (pod,) = [p for p in km.objects("v1/pods") if p["metadata"]["name"] == lost.name]
    assert condition(pod, "DisruptionTarget")["reason"] == "DeletionByTaintManager"
    # the Job's podFailurePolicy ignored the disrupted pod: no failure counted, same Job
    status = (job(km, train) or {})["status"]
    assert status.get("failed", 0) == 0 and condition(job(km, train) or {}, "Complete")
    assert run.stage_job("train", 2) not in stage_jobs(km, run)
    # the replacement resumed after the backed-up epoch instead of starting over
    (resumed,) = events(replacement.log, "resuming")
    assert resumed["epoch"] >= 1
    assert [e["epoch"] for e in events(replacement.log, "epoch")] == list(
        range(resumed["epoch"] + 1, resumed["epochs"] + 1)
    )
    (controller_pod,) = pods_of(kubelet, run.controller_job)
    assert not events(controller_pod.log, "job_failed")


def test_the_runs_containers_report_to_the_pushgateway_and_mlflow(
    finished_run: FinishedRun, pushgateway_url: str, mlflow_uri: str
) -> None:
    """The observability integrations from inside the image (read-only root, uid 10001)."""
    run, kubelet = finished_run.release, finished_run.kubelet
    for pod in kubelet.pods:
        failed = events(pod.log, "mlflow_failed") + events(pod.log, "pushgateway_push_failed")
        assert failed == [], (pod.name, failed)
    metrics = get_json(open_store(run.layout.stage_uri("evaluate")), "metrics.json")
    scrape = urllib.request.urlopen(f"{pushgateway_url}/metrics", timeout=10).read().decode()

    def pushed(name: str, **labels: str) -> float:
        wanted = {"run_id": run.run_id, **labels}
        found = [
            float(line.rsplit(" ", 1)[1])
            for line in scrape.splitlines()
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in wanted.items())
        ]
        assert len(found) == 1, (name, labels, found)
        return found[0]

    assert pushed("skinlesion_eval_balanced_accuracy") == pytest.approx(
        metrics["balanced_accuracy"]
    )
    assert pushed("skinlesion_run_state", state="succeeded") == 1.0  # the controller's push
    assert pushed("skinlesion_stage_exit_code", stage="promote") == 0.0
    values = run.rendered.stage_jobs()["train"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in values["env"]}
    tracking = MlflowClient(mlflow_uri)
    experiment = tracking.get_experiment_by_name(env["MLFLOW_EXPERIMENT_NAME"])
    assert experiment is not None
    (found,) = tracking.search_runs(
        [experiment.experiment_id], f"tags.`{mlflow_log.RUN_TAG}` = '{run.run_id}'"
    )
    assert found.data.metrics["balanced_accuracy"] == pytest.approx(metrics["balanced_accuracy"])
    champion = get_json(open_store(f"{run.store}/models"), "registry.json")["aliases"]["champion"]
    version = tracking.get_model_version_by_alias(env["SKINLESION_MLFLOW_MODEL"], "champion")
    assert version.tags[mlflow_log.VERSION_TAG] == str(champion)


# --- 3: bad input ---------------------------------------------------------------------------


def test_bad_input_ends_a_scheduled_run_at_once_with_exit_2(
    cluster: Cluster, built_image: Built, s3_server: S3Server, raw_data: str
) -> None:
    raw = open_store(raw_data)
    bad_uri = raw_data.replace("/HAM10000", f"-bad-{uuid.uuid4().hex[:6]}/HAM10000")
    bad = open_store(bad_uri)
    text = raw.get_bytes("HAM10000_metadata.csv").decode().splitlines()
    fields = text[3].split(",")
    fields[2] = "melanoma?"  # dx: not a class
    text[3] = ",".join(fields)
    bad.put_bytes("HAM10000_metadata.csv", ("\n".join(text) + "\n").encode())
    km, kubelet = cluster.km, cluster.kubelet
    run = install(km, built_image, s3_server, bad_uri, scheduled=True)
    controller = wait_job_end(kubelet, km, run.controller_job, RUN_TIMEOUT_S)
    (controller_pod,) = pods_of(kubelet, run.controller_job)
    # prepare: one Job, one pod, exit 2, failed by the podFailurePolicy (no retry)
    assert stage_jobs(km, run) == [run.stage_job("prepare")], controller_pod.log[-3000:]
    (pod,) = pods_of(kubelet, run.stage_job("prepare"))
    assert pod.exit_code == 2
    # a scheduled run: the run id from the controller's own Job name (its pod's job-name
    # label, through the chart's fieldRef), the lesion-hash split of schedule.split
    assert run.run_id.startswith("retrain-") and run.stage_job("prepare") in kubelet.runs
    args = pod.docker_args
    assert args[args.index("--split") + 1] == "lesion-hash"
    error = [line for line in pod.log.splitlines() if line.startswith("skinlesion prepare: error:")]
    assert len(error) == 1 and "line 4" in error[0] and "dx" in error[0], pod.log[-2000:]
    failed = condition(job(km, run.stage_job("prepare")) or {}, "Failed")
    assert failed["reason"] == "PodFailurePolicy" and "exit code 2" in failed["message"]
    # the controller: exit 2 at once, its own Job failed by the same policy (no pod retry)
    assert controller_pod.exit_code == 2, controller_pod.log[-3000:]
    assert condition(controller, "Failed")["reason"] == "PodFailurePolicy"
    assert "bad input (not retried)" in controller_pod.log
    # the failed pod's log, captured by the controller, is in the store
    saved = open_store(run.layout.logs_uri).get_bytes(run.layout.log_key("prepare", 1)).decode()
    assert error[0] in saved


# --- 4: out of memory -----------------------------------------------------------------------


def test_a_stage_killed_at_its_memory_limit_is_reported_and_retried_with_more(
    cluster: Cluster, built_image: Built, s3_server: S3Server, raw_data: str
) -> None:
    km, kubelet = cluster.km, cluster.kubelet
    low = "128Mi"
    values = {"stages": {"prepare": {"resources": {"limits": {"memory": low}},
                                     "oomRetry": {"factor": 16, "maxMemory": "2Gi"}}}}  # fmt: skip
    run = install(km, built_image, s3_server, raw_data, values)
    first, second = run.stage_job("prepare"), run.stage_job("prepare", 2)
    wait_job_end(kubelet, km, first, RUN_TIMEOUT_S)
    (oom,) = pods_of(kubelet, first)
    assert oom.reason == "OOMKilled" and oom.exit_code == 137 and oom.memory_limit == low
    (pod,) = [p for p in km.objects("v1/pods") if p["metadata"]["name"] == oom.name]
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["reason"] == "OOMKilled"
    # the retry gets 16 x 128Mi, and runs through
    wait_job_end(kubelet, km, second, RUN_TIMEOUT_S)
    (retry,) = pods_of(kubelet, second)
    assert retry.memory_limit == "2Gi" and retry.exit_code == 0, retry.log[-2000:]
    # the controller said so in one line
    kubelet.wait_for(lambda: kubelet.running(run.stage_job("augment")) is not None,
                     RUN_TIMEOUT_S, "augment started")  # fmt: skip
    controller = kubelet.running(run.controller_job)
    assert controller is not None
    log = kubelet.logs(controller.container)
    (said,) = events(log, "stage_oom_killed")
    assert said["message"] == (
        f"stage prepare ran out of memory (OOMKilled at limit {low}): the next attempt gets 2Gi"
    )
    # deleting the controller Job stops the run: the controller deletes its stage Job
    client.BatchV1Api(client.ApiClient(km.configuration())).delete_namespaced_job(
        run.controller_job, NS, propagation_policy="Background", _preload_content=False
    )
    augment = kubelet.running(run.stage_job("augment"))
    assert augment is not None
    kubelet.wait_for(lambda: controller.exit_code is not None, 120, "the controller's exit")
    assert controller.exit_code == 143
    assert job(km, run.stage_job("augment")) is None  # deleted by the controller
    # ...and its pod ended within its grace period: done, or stopped by the SIGTERM (143),
    # never by the SIGKILL after the grace period (137)
    kubelet.wait_for(lambda: augment.exit_code is not None, 120, "the augment pod's exit")
    assert augment.exit_code in (0, 143), augment.log[-2000:]
