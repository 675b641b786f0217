"""The executing kubelet itself (tests/docker_kubelet.py): what it honours, shown on small
pods of the built image (a shell command each, seconds), and its podFailurePolicy rules."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from skinlesion.kube_jobs import job_state
from tests.cluster_auth import ClusterAuth
from tests.docker_engine import Built
from tests.docker_kubelet import DockerKubelet, PodRecord, pod_failure_action
from tests.docker_pod import PodConfigError
from tests.kmock_server import KMock

NS = "kubelet-test"
TIMEOUT_S = 300  # a hang guard


def job_body(name: str, image: str, script: str, **pod: Any) -> dict[str, Any]:
    container = {"name": "stage", "image": image, "imagePullPolicy": "Never",
                 "command": ["sh", "-c", script], **pod.pop("container", {})}  # fmt: skip
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": NS, "labels": {"app": name}},
        "spec": {
            "backoffLimit": 0,
            **pod.pop("job", {}),
            "template": {
                "metadata": {"labels": {"app": name, "tier": "test"}},
                "spec": {"restartPolicy": "Never", "containers": [container], **pod},
            },
        },
    }


class Harness:
    def __init__(self, km: KMock, kubelet: DockerKubelet, image: str) -> None:
        self.km, self.kubelet, self.image = km, kubelet, image
        self.api = client.ApiClient(km.configuration())

    def post(self, plural: str, body: dict[str, Any], group: str = "api/v1") -> None:
        self.api.call_api(
            "POST",
            f"{self.km.url}/{group}/namespaces/{NS}/{plural}",
            header_params={"Content-Type": "application/json"},
            body=body,
        )

    def run(self, body: dict[str, Any]) -> tuple[dict[str, Any], list[PodRecord]]:
        name = body["metadata"]["name"]
        self.post("jobs", body, "apis/batch/v1")

        def job() -> dict[str, Any]:
            found = [j for j in self.km.objects("batch/v1/jobs") if j["metadata"]["name"] == name]
            return found[0] if found else {}

        self.kubelet.wait_for(lambda: job_state(job()) is not None, TIMEOUT_S, name)
        return job(), [p for p in self.kubelet.pods if p.job == name]


@pytest.fixture
def harness(built_image: Built, tmp_path: Path) -> Iterator[Harness]:
    with KMock() as km:
        auth = ClusterAuth(km, tmp_path / "apiserver")
        kubelet = DockerKubelet(km, auth, NS, tmp_path / "pods", backoff_s=0.1)
        h = Harness(km, kubelet, built_image.name)
        sa = {"apiVersion": "v1", "kind": "ServiceAccount",
              "metadata": {"name": "default", "namespace": NS}}  # fmt: skip
        h.post("serviceaccounts", sa)
        with kubelet:
            yield h


def failed_reason(job: dict[str, Any]) -> str:
    for cond in job["status"]["conditions"]:
        if cond["type"] == "Failed":
            return str(cond["reason"])
    return ""


# --- the Job controller's podFailurePolicy (pure) -----------------------------------------

POLICY = {
    "rules": [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailJob",
         "onExitCodes": {"containerName": "stage", "operator": "In", "values": [2, 3]}},
        {"action": "Count", "onExitCodes": {"operator": "NotIn", "values": [2, 3]}},
    ]
}  # fmt: skip


def pod(conditions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "namespace": NS},
        "spec": {"containers": [{"name": "stage"}]},
        "status": {"conditions": conditions or []},
    }


def test_pod_failure_policy_rules_apply_in_order() -> None:
    spec = {"podFailurePolicy": POLICY}
    disrupted = pod([{"type": "DisruptionTarget", "status": "True"}])
    assert pod_failure_action(spec, disrupted, PodRecord("p", "j", exit_code=2))[0] == "Ignore"
    action, message = pod_failure_action(spec, pod(), PodRecord("p", "j", exit_code=2))
    assert action == "FailJob"
    assert message == (
        f"Container stage for pod {NS}/p failed with exit code 2 matching FailJob rule at index 1"
    )
    assert pod_failure_action(spec, pod(), PodRecord("p", "j", exit_code=1))[0] == "Count"
    assert pod_failure_action({}, pod(), PodRecord("p", "j", exit_code=2))[0] == "Count"


# --- pods for real --------------------------------------------------------------------------


@pytest.mark.pods
@pytest.mark.slow
def test_env_volumes_identity_and_limits_reach_the_container(harness: Harness) -> None:
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "namespace": NS},
              "data": {"key": base64.b64encode(b"s3cr3t").decode()}}  # fmt: skip
    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": NS},
              "data": {"greeting": "hello", "file.yaml": "a: 1\n"}}  # fmt: skip
    harness.post("secrets", secret)
    harness.post("configmaps", config)
    script = (
        'echo "env $FROM_SECRET $FROM_CONFIG $TIER $POD $EXPANDED"; id -u; id -G;'
        " grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status;"
        " cat /etc/c/file.yaml; touch /etc/c/x 2>/dev/null && echo config-writable;"
        " touch /opt/x 2>/dev/null && echo root-writable;"
        " dd if=/dev/zero of=/scratch/big bs=1M count=3 2>/dev/null || echo scratch-full;"
        " cd /sys/fs/cgroup; cat memory.max cpu.max 2>/dev/null"  # cgroup v2, else v1
        " || cat memory/memory.limit_in_bytes cpu/cpu.cfs_quota_us"
    )
    body = job_body(
        "probe",
        harness.image,
        script,
        securityContext={"runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 2000,
                         "runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        volumes=[{"name": "c", "configMap": {"name": "c"}},
                 {"name": "scratch", "emptyDir": {"sizeLimit": "2Mi"}}],
        container={
            "env": [
                {"name": "FROM_SECRET",
                 "valueFrom": {"secretKeyRef": {"name": "s", "key": "key"}}},
                {"name": "FROM_CONFIG",
                 "valueFrom": {"configMapKeyRef": {"name": "c", "key": "greeting"}}},
                {"name": "TIER",
                 "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['tier']"}}},
                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "EXPANDED", "value": "<$(FROM_CONFIG)>"},
            ],
            "securityContext": {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]}},
            "volumeMounts": [{"name": "c", "mountPath": "/etc/c"},
                             {"name": "scratch", "mountPath": "/scratch"}],
            "resources": {"limits": {"memory": "300Mi", "cpu": "500m"}},
        },
    )  # fmt: skip
    job, (record,) = harness.run(body)
    assert job_state(job) == "Complete", record.log
    lines = record.log.splitlines()
    assert lines[0] == f"env s3cr3t hello test {record.name} <hello>"
    assert lines[1] == "10001" and "2000" in lines[2].split()
    status = dict(line.split(":\t") for line in lines[3:6])
    assert status == {"CapEff": "0000000000000000", "NoNewPrivs": "1", "Seccomp": "2"}
    limits = [line.split()[0] for line in lines[8:]]
    assert lines[6:8] == ["a: 1", "scratch-full"]
    assert limits == [str(300 * 2**20), "50000"]  # 300Mi; 0.5 CPU of a 100 ms period
    assert "s3cr3t" not in " ".join(record.docker_args)  # values never on the command line


@pytest.mark.pods
@pytest.mark.slow
def test_deadline_failures_and_a_spec_it_cannot_honour(harness: Harness) -> None:
    job, (record,) = harness.run(
        job_body(
            "slow",
            harness.image,
            "sleep 120",
            job={"activeDeadlineSeconds": 3},
            terminationGracePeriodSeconds=1,
        )
    )
    assert failed_reason(job) == "DeadlineExceeded" and record.exit_code in (137, 143)
    job, records = harness.run(
        job_body("flaky", harness.image, "echo trying; exit 7", job={"backoffLimit": 1})
    )
    assert failed_reason(job) == "BackoffLimitExceeded" and job["status"]["failed"] == 2
    assert [r.exit_code for r in records] == [7, 7] and records[0].log == "trying\n"
    job, _ = harness.run(
        job_body("nosecret", harness.image, "true", container={"env": [
            {"name": "X", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}]})
    )  # fmt: skip
    assert failed_reason(job) == "TestKubeletError"
    with pytest.raises(PodConfigError, match='secret "absent" not found'):
        raise harness.kubelet.errors.pop()
