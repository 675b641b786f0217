"""Multi-worker training in the chart: `stages.<stage>.workers` > 1 renders the stage as an
Indexed Job with a headless Service (and a NetworkPolicy between its pods), and each pod
derives its TF_CONFIG from its completion index."""

from __future__ import annotations

import json
from typing import Any

import helm_python as helm
import pytest

from skinlesion.kube_jobs import StagesFile, build_job, job_name
from skinlesion.pipeline import StageCall
from skinlesion.stages import STAGE_BY_NAME
from skinlesion.train_cluster import Cluster
from tests import chart_render as cr
from tests.chart_render import pod_spec


def _workers(n: int, stage: str = "train") -> cr.Rendered:
    return cr.render(values={"stages": {stage: {"workers": n}}})


def _env(job: dict[str, Any]) -> dict[str, Any]:
    spec = pod_spec(job)
    assert spec is not None
    (container,) = spec["containers"]
    return {e["name"]: e for e in container["env"]}


def test_one_worker_is_a_plain_job_without_a_service() -> None:
    rendered = _workers(1)
    job = rendered.stage_jobs()["train"]
    assert "completionMode" not in job["spec"] and "completions" not in job["spec"]
    assert "subdomain" not in job["spec"]["template"]["spec"]
    assert not {"SKINLESION_WORKERS", "SKINLESION_STAGE_JOB"} & set(_env(job))
    assert not rendered.kind("Service") or all(
        not s["metadata"]["name"].endswith("-workers") for s in rendered.kind("Service")
    )


@pytest.mark.parametrize("kube_version", cr.KUBE_VERSIONS)
def test_four_workers_are_an_indexed_job_with_a_headless_service(kube_version: str) -> None:
    rendered = _workers(4)
    job = rendered.stage_jobs()["train"]
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 4, 4)
    pod = spec["template"]["spec"]
    (service,) = [s for s in rendered.kind("Service") if s["metadata"]["name"].endswith("-workers")]
    assert pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    # The Service selects exactly the train stage's pods.
    labels = spec["template"]["metadata"]["labels"]
    selector = service["spec"]["selector"]
    assert selector["app.kubernetes.io/component"] == "train"
    assert all(labels[k] == v for k, v in selector.items())
    (container,) = pod["containers"]
    port = container["ports"][0]
    assert port["containerPort"] == service["spec"]["ports"][0]["port"] == 2222
    env = _env(job)
    assert env["SKINLESION_WORKERS"]["value"] == "4"
    assert env["SKINLESION_WORKER_SERVICE"]["value"] == service["metadata"]["name"]
    field = env["SKINLESION_STAGE_JOB"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert field == "metadata.labels['batch.kubernetes.io/job-name']"
    # Only train: the other stages stay single Jobs.
    assert "completionMode" not in rendered.stage_jobs()["finetune"]["spec"]
    # The pods may reach each other on the worker port, nothing more.
    (policy,) = [
        p for p in rendered.kind("NetworkPolicy") if p["metadata"]["name"].endswith("-workers")
    ]
    ingress, egress = policy["spec"]["ingress"], policy["spec"]["egress"]
    assert ingress[0]["from"][0]["podSelector"]["matchLabels"] == selector
    assert egress[0]["to"][0]["podSelector"]["matchLabels"] == selector
    assert [p["port"] for p in ingress[0]["ports"] + egress[0]["ports"]] == [2222, 2222]
    for obj in (service, policy):
        cr.validate(obj, kube_version)
    # The Job the controller builds from that shape (name, labels, args) is still valid, and
    # its pods' hostnames <job>-<index> stay DNS labels even for the longest names.
    stages = StagesFile(None, None, None, rendered.stage_jobs())
    call = StageCall(STAGE_BY_NAME["train"], ("train", "--phase", "top"), "s3://b/o", {}, {})
    built = build_job(stages, call, cr.NAMESPACE, "x" * 60, "r" * 40, 10)
    cr.validate(built, kube_version)
    assert len(f"{built['metadata']['name']}-3") <= 63
    assert built["metadata"]["name"] == job_name("x" * 60, "train", "r" * 40, 10)


def test_each_pod_derives_its_tf_config_from_its_completion_index() -> None:
    env = _env(_workers(4).stage_jobs()["train"])
    service = env["SKINLESION_WORKER_SERVICE"]["value"]
    pods = {
        "SKINLESION_WORKERS": env["SKINLESION_WORKERS"]["value"],
        "SKINLESION_WORKER_SERVICE": service,
        "SKINLESION_WORKER_PORT": env["SKINLESION_WORKER_PORT"]["value"],
        "SKINLESION_STAGE_JOB": "skinlesion-train-r1",  # what the downward API gives
    }
    configs = []
    for index in range(4):
        cluster = Cluster.from_env({**pods, "JOB_COMPLETION_INDEX": str(index)})
        assert cluster is not None and cluster.chief == (index == 0)
        configs.append(json.loads(cluster.tf_config()))
    hosts = [f"skinlesion-train-r1-{i}.{service}:2222" for i in range(4)]
    for index, tf_config in enumerate(configs):
        assert tf_config == {
            "cluster": {"worker": hosts},
            "task": {"type": "worker", "index": index},
        }
    assert Cluster.from_env({"SKINLESION_WORKERS": "1"}) is None
    assert Cluster.from_env({}) is None


def test_workers_only_for_the_training_stages() -> None:
    with pytest.raises(Exception, match="only train and finetune"):
        _workers(2, "prepare")
    with pytest.raises(helm.HelmValuesError):
        _workers(0)
