"""The Helm chart, rendered with Helm's Go SDK (no helm binary, no cluster).

Rendered for the default values and for every values file the Makefile's Kubernetes
targets use; every object, and every stage Job embedded in the ConfigMap, is checked
with `kubernetes-validate --strict`, and against the contracts of the controller
(stages.yaml), of skinlesion/config.py (pipeline.yaml and the values schema), of the
stage list (skinlesion/stages.py) and of the image (Dockerfile).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import helm_python as helm
import pytest
import yaml

from skinlesion import config, registry
from skinlesion.classes import CLASSES
from skinlesion.errors import NOT_RETRIED
from skinlesion.stages import STAGE_BY_NAME, STAGES
from tests import chart_render as cr
from tests import chart_schema, lockfile
from tests.chart_render import Rendered, containers, job_spec, pod_spec

GPU = "nvidia.com/gpu"
UID = 10001  # the Dockerfile's user
STAGE_NAMES = [s.name for s in STAGES]
KIND_VALUES = cr.CHART / "values-kind.yaml"

# Values sets rendered by most tests: the defaults, each values file the Makefile uses
# (as `make deploy`/`kind-up` pass it, and with the run `make kind-test` starts), and
# one with every optional part switched on.
EVERYTHING_ON = {
    "image": {"pullSecrets": ["regcred"], "tag": "1.2.3", "gpuTag": "1.2.3-cuda"},
    "store": {"endpoint": "https://s3.example.org", "prefix": "team/skin", "raw": "s3://data/ham"},
    "pools": {
        "cpu": {
            "nodeSelector": {"pool": "cpu"},
            "tolerations": [{"key": "batch", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {"key": "arch", "operator": "In", "values": ["amd64"]}
                                ]
                            }
                        ]
                    }
                }
            },
        },
        "gpu": {"nodeSelector": {"nvidia.com/gpu.present": "true"}, "gpuCount": 2},
    },
    "schedule": {"enabled": True},
    "run": {"id": "nightly-1"},
    "minio": {"enabled": True, "persistence": {"enabled": False}},
    "serviceAccount": {
        "controller": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/c"}},
        "stages": {
            "annotations": {"iam.gke.io/gcp-service-account": "s@p.iam.gserviceaccount.com"}
        },
    },
    "podAnnotations": {"example.com/team": "ml"},
    "podLabels": {"cost-centre": "research"},
    "networkPolicy": {
        "dns": {
            "to": [
                {"namespaceSelector": {}, "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}
            ]
        },
        "apiServer": {"to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}]},
        "extraEgress": [{"ports": [{"protocol": "TCP", "port": 9091}]}],
    },
    "metrics": {"pushgateway": {"url": "http://pushgateway.monitoring:9091"}},
    "notify": {"webhookUrl": {"existingSecret": "slack-hook", "key": "url"}},
}
# Static keys as a mounted shared-credentials file; no static keys at all (pod identity).
CREDENTIALS_FILE: dict[str, Any] = {"store": {"credentials": "file"}}
PINNED: dict[str, Any] = {
    "image": {"digest": "sha256:" + "a" * 64, "gpuDigest": "sha256:" + "b" * 64}
}
NO_STATIC_KEYS: dict[str, Any] = {
    "store": {"existingSecret": ""},
    "networkPolicy": {"enabled": False},
}
VALUE_SETS: dict[str, tuple[list[Path], dict[str, Any]]] = {
    "default": ([], {}),
    **{f.name: ([f], {}) for f in cr.makefile_values_files()},
    **{
        f"{f.name}+run": ([f], {"run": {"enabled": True, "id": "kt-20250101120000"}})
        for f in cr.makefile_values_files()
    },
    "everything-on": ([], EVERYTHING_ON),
    "credentials-file": ([], CREDENTIALS_FILE),
    "no-static-keys": ([], NO_STATIC_KEYS),
    "pinned-by-digest": ([], PINNED),
}


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def case(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any], Rendered]:
    """(name, the values as the chart sees them, the rendered chart)."""
    files, overrides = VALUE_SETS[request.param]
    user = cr.merged_values(files, overrides)
    with helm.Chart.load(str(cr.CHART)) as chart:
        values = chart.merge_values(user)
    return request.param, values, cr.render(files, overrides)


def test_makefile_values_files_exist_and_include_kind() -> None:
    files = cr.makefile_values_files()
    assert KIND_VALUES in files
    for f in files:
        assert f.is_file(), f"the Makefile uses {f}, which does not exist"


# --- lint and validation -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_lint_is_clean(name: str) -> None:
    files, overrides = VALUE_SETS[name]
    report = cr.lint(files, overrides)
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors
    assert problems == []


@pytest.mark.parametrize("kube_version", cr.KUBE_VERSIONS)
def test_every_object_passes_kubernetes_validate_strict(case: Any, kube_version: str) -> None:
    _, _, rendered = case
    objects = [(f"{o['kind']}/{o['metadata']['name']}", o) for o in rendered.objects]
    objects += [(f"stages.yaml/{n}", j) for n, j in rendered.stage_jobs().items()]
    assert len(objects) >= 6 + 6
    for name, obj in objects:
        try:
            cr.validate(obj, kube_version)
        except cr.kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{name} fails kubernetes-validate {kube_version}: {path}: {exc.message}")


def test_renders_the_expected_objects(case: Any) -> None:
    _, values, rendered = case
    kinds = sorted(o["kind"] for o in rendered.objects)
    expected = ["ConfigMap", "CronJob", "Role", "RoleBinding", "ServiceAccount", "ServiceAccount"]
    if values["networkPolicy"]["enabled"]:
        expected += ["NetworkPolicy", "NetworkPolicy"]
    if values["run"]["enabled"]:
        expected.append("Job")
    if values["minio"]["enabled"]:
        expected += ["Deployment", "Service"]
        if values["minio"]["persistence"]["enabled"]:
            expected.append("PersistentVolumeClaim")
    assert kinds == sorted(expected)
    assert not rendered.kind("Secret"), "credentials come from an existing Secret only"
    assert not rendered.kind("ClusterRole") and not rendered.kind("ClusterRoleBinding")
    for obj in rendered.objects:
        assert obj["metadata"]["namespace"] == cr.NAMESPACE


# --- security --------------------------------------------------------------------------------


def _assert_restricted(where: str, spec: dict[str, Any]) -> None:
    pod = spec.get("securityContext", {})
    assert pod.get("runAsNonRoot") is True, where
    assert pod.get("runAsUser", 0) != 0, where
    assert pod.get("seccompProfile") == {"type": "RuntimeDefault"}, where
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not spec.get(key), f"{where}: {key}"
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for v in volumes.values():
        assert "hostPath" not in v, f"{where}: hostPath volume {v['name']}"
    for c in containers(spec):
        at = f"{where} container {c['name']}"
        sc = c.get("securityContext", {})
        assert sc.get("allowPrivilegeEscalation") is False, at
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], at
        assert not sc.get("capabilities", {}).get("add"), at
        assert not sc.get("privileged"), at
        assert sc.get("readOnlyRootFilesystem") is True, at
        assert sc.get("runAsNonRoot", True) is True, at
        assert sc.get("runAsUser", pod.get("runAsUser")) != 0, at
        assert sc.get("seccompProfile", pod["seccompProfile"]) == {"type": "RuntimeDefault"}, at
        # Writable paths of a read-only root: emptyDir (or MinIO's data claim).
        for m in c.get("volumeMounts", []):
            if m.get("readOnly"):
                continue
            vol = volumes[m["name"]]
            assert "emptyDir" in vol or "persistentVolumeClaim" in vol, f"{at}: {m}"
        mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
        assert "/tmp" in mounts, f"{at}: no writable /tmp"


def test_every_pod_meets_pod_security_restricted(case: Any) -> None:
    _, values, rendered = case
    workloads = rendered.workloads()
    names = [n for n, _ in workloads]
    assert sum(n.startswith("stages.yaml/") for n in names) == len(STAGES)
    assert any(n.startswith("CronJob/") for n in names)
    assert any(n.startswith("Job/") for n in names) == values["run"]["enabled"]
    assert any(n.startswith("Deployment/") for n in names) == values["minio"]["enabled"]
    for name, obj in workloads:
        spec = pod_spec(obj)
        assert spec is not None
        _assert_restricted(name, spec)


def test_stage_pods_get_no_api_token_and_the_controller_does(case: Any) -> None:
    _, values, rendered = case
    controller = rendered.one("ServiceAccount", "controller")
    stages = rendered.one("ServiceAccount", "stages")
    assert controller["metadata"]["name"] != stages["metadata"]["name"]
    for sa, who in ((controller, "controller"), (stages, "stages")):
        assert sa["automountServiceAccountToken"] is False
        wanted = values["serviceAccount"][who]["annotations"]
        assert sa["metadata"].get("annotations", {}) == wanted
    for name, job in rendered.stage_jobs().items():
        spec = pod_spec(job)
        assert spec is not None
        assert spec["serviceAccountName"] == stages["metadata"]["name"], name
        assert spec["automountServiceAccountToken"] is False, name
    for obj in rendered.kind("Job") + rendered.kind("CronJob"):
        spec = pod_spec(obj)
        assert spec is not None
        assert spec["serviceAccountName"] == controller["metadata"]["name"]
        assert spec["automountServiceAccountToken"] is True
    for dep in rendered.kind("Deployment"):
        assert dep["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_rbac_grants_exactly_what_the_controller_needs(case: Any) -> None:
    _, _, rendered = case
    role = rendered.one("Role")
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    expected = {("batch", "jobs", v) for v in ("create", "get", "list", "watch", "delete")}
    expected |= {("", "pods", v) for v in ("get", "list", "watch")}
    expected |= {("", "pods/log", "get")}
    expected |= {("coordination.k8s.io", "leases", v) for v in ("get", "create", "update", "patch")}
    assert granted == expected
    assert all("resourceNames" not in r and "nonResourceURLs" not in r for r in role["rules"])
    assert sum(len(r["verbs"]) for r in role["rules"]) == len(expected)  # no duplicates

    binding = rendered.one("RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    sa = rendered.one("ServiceAccount", "controller")["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa, "namespace": cr.NAMESPACE}
    ]


def test_credentials_only_come_from_the_existing_secret(case: Any) -> None:
    _, values, rendered = case
    secret = values["store"]["existingSecret"]
    for name, obj in rendered.workloads():
        spec = pod_spec(obj)
        assert spec is not None
        for c in containers(spec):
            env = {e["name"]: e for e in c.get("env", [])}
            for var in env.values():
                if "value" in var:
                    assert "SECRET" not in var["name"] and "PASSWORD" not in var["name"], name
            if c["name"] in ("stage", "controller"):
                _check_store_credentials(name, values["store"], env, c, spec)
            if c["name"] == "minio":
                assert env["MINIO_ROOT_USER"]["valueFrom"]["secretKeyRef"] == {
                    "name": secret,
                    "key": "AWS_ACCESS_KEY_ID",
                }
                assert env["MINIO_ROOT_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
                    "name": secret,
                    "key": "AWS_SECRET_ACCESS_KEY",
                }


def _check_store_credentials(
    name: str, store: dict[str, Any], env: dict[str, Any], c: dict[str, Any], spec: dict[str, Any]
) -> None:
    """Keys as variables from the Secret, or its file mounted read-only, or none at all."""
    secret, mode = store["existingSecret"], store["credentials"]
    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    if secret and mode == "env":
        for key in keys:
            assert env[key]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": key}, name
        assert "AWS_SHARED_CREDENTIALS_FILE" not in env and "s3-credentials" not in mounts
        return
    assert not set(keys) & set(env), name
    if not secret:  # the pod's identity (IRSA / Workload Identity)
        assert "AWS_SHARED_CREDENTIALS_FILE" not in env and "s3-credentials" not in volumes
        return
    mount = mounts["s3-credentials"]
    assert mount["readOnly"] is True, name
    assert env["AWS_SHARED_CREDENTIALS_FILE"]["value"] == f"{mount['mountPath']}/credentials"
    assert volumes["s3-credentials"]["secret"] == {
        "secretName": secret,
        "defaultMode": 0o440,
        "items": [{"key": store["credentialsFileKey"], "path": "credentials"}],
    }


def test_network_policies_allow_only_dns_the_store_and_the_api(case: Any) -> None:
    _, values, rendered = case
    policies = rendered.kind("NetworkPolicy")
    if not values["networkPolicy"]["enabled"]:
        assert not policies
        return
    np = values["networkPolicy"]
    for who in ("stages", "controller"):
        policy = rendered.one("NetworkPolicy", who)["spec"]
        assert policy["policyTypes"] == ["Ingress", "Egress"] and policy["ingress"] == []
        egress = policy["egress"]
        base = 3 if who == "controller" else 2
        assert len(egress) == base + len(np["extraEgress"])
        assert egress[base:] == np["extraEgress"]
        dns, store = egress[0], egress[1]
        assert {(p["protocol"], p["port"]) for p in dns["ports"]} == {("UDP", 53), ("TCP", 53)}
        assert dns.get("to", []) == np["dns"]["to"]
        ports = [p["port"] for p in store["ports"]]
        if np["store"]["ports"]:
            assert ports == np["store"]["ports"]
        elif values["minio"]["enabled"] and not values["store"]["endpoint"]:
            assert ports == [9000]
            selector = store["to"][0]["podSelector"]["matchLabels"]
            assert selector["app.kubernetes.io/component"] == "minio"
        else:
            assert ports == [443]  # AWS S3, or the https endpoint of the test values
        if who == "controller":
            api = egress[2]
            assert [p["port"] for p in api["ports"]] == np["apiServer"]["ports"]
            assert api.get("to", []) == np["apiServer"]["to"]
        # Which pods it selects: the pipeline's own pods of this release, never MinIO.
        sel = policy["podSelector"]
        assert sel["matchLabels"]["app.kubernetes.io/instance"] == cr.RELEASE
        (expr,) = sel["matchExpressions"]
        comps = set(expr["values"])
        if who == "controller":
            assert (expr["operator"], comps) == ("In", {"controller"})
        else:
            assert (expr["operator"], comps) == ("NotIn", {"controller", "minio"})


def test_network_policy_store_port_follows_the_endpoint() -> None:
    for endpoint, port in (
        ("http://minio.data:9000", 9000),
        ("https://s3.example.org", 443),
        ("http://store.local", 80),
    ):
        rendered = cr.render([], {"store": {"endpoint": endpoint}})
        store = rendered.one("NetworkPolicy", "stages")["spec"]["egress"][1]
        assert [p["port"] for p in store["ports"]] == [port], endpoint
    pinned = {
        "networkPolicy": {"store": {"ports": [7480], "to": [{"ipBlock": {"cidr": "10.1.0.0/16"}}]}}
    }
    store = cr.render([], pinned).one("NetworkPolicy", "controller")["spec"]["egress"][1]
    assert store == {
        "ports": [{"protocol": "TCP", "port": 7480}],
        "to": [{"ipBlock": {"cidr": "10.1.0.0/16"}}],
    }


def test_pod_annotations_labels_and_image_digest(case: Any) -> None:
    _, values, rendered = case
    gpu_pool = values["pools"]["gpu"]["requestGpu"]
    pods = [
        (f"stages.yaml/{n}", j, gpu_pool and values["stages"][n]["pool"] == "gpu")
        for n, j in rendered.stage_jobs().items()
    ]
    pods += [(o["kind"], o, False) for o in rendered.kind("Job") + rendered.kind("CronJob")]
    for name, obj, gpu in pods:
        spec = job_spec(obj)
        assert spec is not None
        meta = spec["template"]["metadata"]
        assert meta.get("annotations", {}) == values["podAnnotations"], name
        for key, value in values["podLabels"].items():
            assert meta["labels"][key] == value, name
        image = spec["template"]["spec"]["containers"][0]["image"]
        digest = values["image"]["gpuDigest" if gpu else "digest"]
        if digest:
            assert image == f"{values['image']['repository']}@{digest}", name
        else:
            assert "@" not in image, name


def test_minio_without_a_secret_is_refused() -> None:
    with pytest.raises(Exception, match=r"minio\.enabled needs store\.existingSecret"):
        cr.render([], {"minio": {"enabled": True}, "store": {"existingSecret": ""}})


# --- jobs ------------------------------------------------------------------------------------

POD_FAILURE_RULES = [
    {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    },
    {
        "action": "FailJob",
        # The exit codes that retrying the same pod cannot help (errors.py).
        "onExitCodes": {
            "containerName": "<container>",
            "operator": "In",
            "values": list(NOT_RETRIED),
        },
    },
]


def _expected_rules(container: str) -> list[dict[str, Any]]:
    rules = yaml.safe_load(yaml.safe_dump(POD_FAILURE_RULES))
    rules[1]["onExitCodes"]["containerName"] = container
    return rules  # type: ignore[no-any-return]


def test_every_job_has_restart_never_ttl_and_the_pod_failure_policy(case: Any) -> None:
    _, values, rendered = case
    jobs = [(f"stages.yaml/{n}", j) for n, j in rendered.stage_jobs().items()]
    jobs += [(f"{o['kind']}/{o['metadata']['name']}", o) for o in rendered.kind("Job")]
    jobs += [(f"CronJob/{o['metadata']['name']}", o) for o in rendered.kind("CronJob")]
    for name, obj in jobs:
        spec = job_spec(obj)
        assert spec is not None
        pod = spec["template"]["spec"]
        assert pod["restartPolicy"] == "Never", name
        assert spec["ttlSecondsAfterFinished"] == values["ttlSecondsAfterFinished"], name
        assert spec["activeDeadlineSeconds"] > 0, name
        (container,) = pod["containers"]
        assert spec["podFailurePolicy"]["rules"] == _expected_rules(container["name"]), name


def test_stage_job_settings_come_from_their_values(case: Any) -> None:
    _, values, rendered = case
    for name, job in rendered.stage_jobs().items():
        v = values["stages"][name]
        assert job["spec"]["backoffLimit"] == v["backoffLimit"]
        assert job["spec"]["activeDeadlineSeconds"] == v["activeDeadlineSeconds"]
        volumes = {x["name"]: x for x in job["spec"]["template"]["spec"]["volumes"]}
        assert volumes["scratch"]["emptyDir"]["sizeLimit"] == v["scratchSize"]
    for job in rendered.kind("Job"):
        assert job["spec"]["backoffLimit"] == values["controller"]["backoffLimit"]


def test_cronjob_forbids_overlap_and_follows_the_schedule(case: Any) -> None:
    _, values, rendered = case
    cron = rendered.one("CronJob")
    s = values["schedule"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert cron["spec"]["schedule"] == s["cron"]
    assert cron["spec"]["timeZone"] == s["timeZone"]
    assert cron["spec"]["suspend"] is (not s["enabled"])
    assert cron["spec"]["successfulJobsHistoryLimit"] == s["successfulJobsHistoryLimit"]
    assert cron["spec"]["failedJobsHistoryLimit"] == s["failedJobsHistoryLimit"]
    assert len(cron["metadata"]["name"]) <= 52
    args = pod_spec(cron)["containers"][0]["args"]  # type: ignore[index]
    if s["split"]:
        assert args[args.index("--set") + 1] == f"prepare.split={s['split']}"
    else:
        assert "--set" not in args


def test_scheduled_runs_use_the_lesion_hash_split_by_default() -> None:
    cron = cr.render().one("CronJob")
    args = pod_spec(cron)["containers"][0]["args"]  # type: ignore[index]
    assert args[args.index("--set") + 1] == "prepare.split=lesion-hash"
    plain = cr.render(values={"schedule": {"split": ""}}).one("CronJob")
    assert "--set" not in pod_spec(plain)["containers"][0]["args"]  # type: ignore[index]


# --- GPUs and pools --------------------------------------------------------------------------


def _resources(job: dict[str, Any]) -> dict[str, Any]:
    spec = pod_spec(job)
    assert spec is not None
    return spec["containers"][0]["resources"]  # type: ignore[no-any-return]


def test_gpus_only_on_gpu_stages_with_default_values() -> None:
    rendered = cr.render()
    gpu_stages = {s.name for s in STAGES if s.pool == "gpu"}
    assert gpu_stages == {"train", "finetune"}
    for name, job in rendered.stage_jobs().items():
        res = _resources(job)
        if name in gpu_stages:
            assert res["limits"][GPU] == 1, name
            tolerations = pod_spec(job)["tolerations"]  # type: ignore[index]
            assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in tolerations
        else:
            assert GPU not in res.get("limits", {}) and GPU not in res.get("requests", {}), name
            assert "tolerations" not in pod_spec(job), name  # type: ignore[operator]
    for obj in rendered.objects:
        spec = pod_spec(obj)
        if spec is not None:
            for c in containers(spec):
                assert GPU not in str(c.get("resources")), obj["metadata"]["name"]


def test_gpu_stages_run_the_gpu_image() -> None:
    """The GPU image (`make image-gpu`: <tag>-gpu) where GPUs are requested."""
    rendered = cr.render(values={"image": {"tag": "abc"}})
    images = {n: pod_spec(j)["containers"][0]["image"] for n, j in rendered.stage_jobs().items()}  # type: ignore[index]
    assert images == {
        n: "skinlesion:abc-gpu" if n in ("train", "finetune") else "skinlesion:abc"
        for n in STAGE_NAMES
    }
    for obj in rendered.kind("Job") + rendered.kind("CronJob"):
        assert pod_spec(obj)["containers"][0]["image"] == "skinlesion:abc"  # type: ignore[index]
    kind = cr.render([KIND_VALUES], {"image": {"tag": "abc"}})
    for job in kind.stage_jobs().values():
        assert pod_spec(job)["containers"][0]["image"] == "skinlesion:abc"  # type: ignore[index]


def test_no_stage_requests_a_gpu_on_kind() -> None:
    rendered = cr.render([KIND_VALUES])
    for name, job in rendered.stage_jobs().items():
        assert GPU not in str(_resources(job)), name
        assert "tolerations" not in pod_spec(job), name  # type: ignore[operator]


def test_gpu_count_and_pool_mapping_follow_values() -> None:
    rendered = cr.render(
        values={
            "pools": {"gpu": {"gpuCount": 4}},
            "stages": {"evaluate": {"pool": "gpu"}, "finetune": {"pool": "cpu"}},
        }
    )
    gpus = {n: _resources(j).get("limits", {}).get(GPU) for n, j in rendered.stage_jobs().items()}
    assert gpus == {
        "prepare": None,
        "augment": None,
        "train": 4,
        "finetune": None,
        "evaluate": 4,
        "promote": None,
    }


def test_pool_scheduling_is_copied_to_each_stage(case: Any) -> None:
    _, values, rendered = case
    for name, job in rendered.stage_jobs().items():
        pool = values["pools"][values["stages"][name]["pool"]]
        spec = pod_spec(job)
        assert spec is not None
        for key in ("nodeSelector", "tolerations", "affinity"):
            assert spec.get(key, type(pool[key])()) == pool[key], f"{name}.{key}"
    for obj in rendered.kind("Job") + rendered.kind("CronJob") + rendered.kind("Deployment"):
        spec = pod_spec(obj)
        assert spec is not None
        assert spec.get("nodeSelector", {}) == values["pools"]["cpu"]["nodeSelector"]


def test_default_pools_match_the_stage_list() -> None:
    stages = cr.read_values(cr.CHART / "values.yaml")["stages"]
    assert list(stages) == STAGE_NAMES
    assert {n: s["pool"] for n, s in stages.items()} == {s.name: s.pool for s in STAGES}


# --- the contract with the controller --------------------------------------------------------


def test_stages_yaml_holds_one_complete_job_per_stage(case: Any) -> None:
    _, values, rendered = case
    stages = rendered.stages
    prefix = values["store"]["prefix"]
    store = f"s3://{values['store']['bucket']}" + (f"/{prefix}" if prefix else "")
    assert stages["release"] == cr.RELEASE
    assert stages["namespace"] == cr.NAMESPACE
    assert stages["store"] == store
    assert list(stages["stages"]) == STAGE_NAMES
    repo, tag = values["image"]["repository"], values["image"]["tag"] or "0.1.0"  # appVersion
    image = f"{repo}:{tag}"
    gpu_image = f"{repo}:{values['image']['gpuTag'] or tag + '-gpu'}"
    if values["image"]["digest"]:  # a digest pins the image, whatever the tag
        image = f"{repo}@{values['image']['digest']}"
    if values["image"]["gpuDigest"]:
        gpu_image = f"{repo}@{values['image']['gpuDigest']}"
    for name, entry in stages["stages"].items():
        assert set(entry) == {"job", "oomRetry"}
        assert entry["oomRetry"] == values["stages"][name]["oomRetry"]
        job = entry["job"]
        assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
        assert "name" not in job["metadata"] and "generateName" not in job["metadata"]
        spec = pod_spec(job)
        assert spec is not None
        (c,) = spec["containers"]
        assert c["name"] == "stage"
        entrypoint = STAGE_BY_NAME[name].job
        assert c["command"] == ["python", f"/app/jobs/{entrypoint}.py"]
        assert (cr.ROOT / "jobs" / f"{entrypoint}.py").is_file()
        assert "args" not in c, "the controller adds the stage's arguments"
        gpus = values["stages"][name]["pool"] == "gpu" and values["pools"]["gpu"]["requestGpu"]
        assert c["image"] == (gpu_image if gpus else image), name
        assert c["imagePullPolicy"] == values["image"]["pullPolicy"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["SKINLESION_SCRATCH"] == env["TMPDIR"] == "/scratch"
        assert env[registry.IMAGE_TAG_ENV] == c["image"]  # what a promotion records
        assert env["HOME"] == "/scratch"
        assert env["AWS_REGION"] == values["store"]["region"]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert mounts["/scratch"] == "scratch"
        pulls = [s["name"] for s in spec.get("imagePullSecrets", [])]
        assert pulls == values["image"]["pullSecrets"]


def test_store_endpoint_points_at_minio_or_the_configured_endpoint(case: Any) -> None:
    _, values, rendered = case
    endpoint = values["store"]["endpoint"]
    if not endpoint and values["minio"]["enabled"]:
        svc = rendered.one("Service", "minio")
        port = {p["name"]: p["port"] for p in svc["spec"]["ports"]}["s3"]
        endpoint = f"http://{svc['metadata']['name']}.{cr.NAMESPACE}.svc:{port}"
    for name, obj in rendered.workloads():
        spec = pod_spec(obj)
        assert spec is not None
        for c in spec["containers"]:
            if c["name"] in ("stage", "controller"):
                env = {e["name"]: e.get("value") for e in c["env"]}
                assert env.get("AWS_ENDPOINT_URL") == (endpoint or None), name


def _controller_args(obj: dict[str, Any]) -> list[str]:
    spec = pod_spec(obj)
    assert spec is not None
    (c,) = spec["containers"]
    assert c["name"] == "controller"
    assert c["command"] == ["python", "/app/jobs/controller.py"]
    return list(c["args"])


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_controller_command_and_mounts(case: Any) -> None:
    _, values, rendered = case
    cm = rendered.stages_configmap
    prefix = values["store"]["prefix"]
    store = f"s3://{values['store']['bucket']}" + (f"/{prefix}" if prefix else "")
    for obj in rendered.kind("Job") + rendered.kind("CronJob"):
        args = _controller_args(obj)
        spec = pod_spec(obj)
        assert spec is not None
        (c,) = spec["containers"]
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        assert mounts["/etc/skinlesion"]["readOnly"] is True
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert (
            volumes[mounts["/etc/skinlesion"]["name"]]["configMap"]["name"]
            == cm["metadata"]["name"]
        )
        for flag, key in (("--stages", "stages.yaml"), ("--config", "pipeline.yaml")):
            assert _flag(args, flag) == f"/etc/skinlesion/{key}"
            assert key in cm["data"]
        assert _flag(args, "--preset") == values["pipeline"]["preset"]
        assert _flag(args, "--namespace") == cr.NAMESPACE
        assert _flag(args, "--release") == cr.RELEASE
        assert _flag(args, "--store") == store
        assert _flag(args, "--raw") == (values["store"]["raw"] or f"{store}/raw/HAM10000")
        env = {e["name"]: e for e in c["env"]}
        assert env["SKINLESION_JOB_NAME"]["valueFrom"] == {
            "fieldRef": {"fieldPath": "metadata.labels['job-name']"}
        }
    cron_args = _controller_args(rendered.one("CronJob"))
    assert "--run-id-from-job" in cron_args and "--run-id" not in cron_args
    for job in rendered.kind("Job"):
        args = _controller_args(job)
        run_id = values["run"]["id"] or "rev-1"
        assert _flag(args, "--run-id") == run_id and "--run-id-from-job" not in args
        assert job["metadata"]["name"].endswith(f"-run-{run_id}")
        assert job["metadata"]["labels"]["skinlesion.io/run-id"] == run_id


def test_controller_arguments_parse_with_the_real_cli() -> None:
    pytest.importorskip("skinlesion.controller", reason="controller not implemented yet")
    from skinlesion.cli import build_parser

    rendered = cr.render(values=EVERYTHING_ON)
    for obj in rendered.kind("Job") + rendered.kind("CronJob"):
        args = build_parser().parse_args(["controller", *_controller_args(obj)])
        assert args.preset == "default"
        assert args.config == "/etc/skinlesion/pipeline.yaml"


def test_default_run_id_follows_the_release_revision() -> None:
    rendered = cr.render(revision=7)
    (job,) = rendered.kind("Job")
    assert _flag(_controller_args(job), "--run-id") == "rev-7"
    assert job["metadata"]["name"] == "skinlesion-run-rev-7"


# --- labels and names ------------------------------------------------------------------------

STANDARD_LABELS = (
    "helm.sh/chart",
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/component",
)


def test_every_object_and_pod_carries_the_standard_labels(case: Any) -> None:
    _, _, rendered = case
    objects = [(o["metadata"]["name"], o) for o in rendered.objects]
    objects += [(f"stages.yaml/{n}", j) for n, j in rendered.stage_jobs().items()]
    for name, obj in objects:
        labels = obj["metadata"]["labels"]
        for key in STANDARD_LABELS:
            assert key in labels, f"{name}: {key}"
        assert labels["app.kubernetes.io/name"] == "skinlesion"
        assert labels["app.kubernetes.io/instance"] == cr.RELEASE
    for name, obj in rendered.workloads():
        template = obj["spec"]["jobTemplate"]["spec"] if obj["kind"] == "CronJob" else obj["spec"]
        pod_labels = template["template"]["metadata"]["labels"]
        for key in STANDARD_LABELS:
            assert key in pod_labels, f"{name} pod: {key}"
    for name, job in rendered.stage_jobs().items():
        assert job["metadata"]["labels"]["app.kubernetes.io/component"] == name
        pod_labels = job["spec"]["template"]["metadata"]["labels"]
        assert pod_labels["app.kubernetes.io/component"] == name
        assert job["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "skinlesion-controller"
    for obj in rendered.kind("Job") + rendered.kind("CronJob"):
        assert obj["metadata"]["labels"]["app.kubernetes.io/component"] == "controller"


def test_minio_selectors_match_its_pods() -> None:
    rendered = cr.render([KIND_VALUES])
    dep = rendered.one("Deployment", "minio")
    svc = rendered.one("Service", "minio")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    for selector in (dep["spec"]["selector"]["matchLabels"], svc["spec"]["selector"]):
        assert selector.items() <= pod_labels.items()
        assert selector["app.kubernetes.io/component"] == "minio"
    claim = rendered.one("PersistentVolumeClaim", "minio")
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_names_fit_kubernetes_limits_with_a_long_release_name() -> None:
    release = "a-very-long-release-name-for-the-skin-lesion-pipelin"  # 52 chars
    helm.validate_release_name(release)
    run_id = "x" * 40
    rendered = cr.render(values=EVERYTHING_ON | {"run": {"id": run_id}}, release=release)
    for obj in rendered.objects:
        name = obj["metadata"]["name"]
        assert len(name) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name
    assert len(rendered.one("CronJob")["metadata"]["name"]) <= 52
    (job,) = rendered.kind("Job")
    assert job["metadata"]["name"].endswith(f"-run-{run_id}")
    names = [(o["kind"], o["metadata"]["name"]) for o in rendered.objects]
    assert len(names) == len(set(names))


# --- the values schema -----------------------------------------------------------------------

BAD_VALUES: dict[str, dict[str, Any]] = {
    "misspelled top-level key": {"imagee": {"tag": "x"}},
    "misspelled stage key": {"stages": {"train": {"resourcez": {}}}},
    "unknown stage": {"stages": {"trian": {"pool": "gpu"}}},
    "misspelled pipeline field": {"pipeline": {"train": {"bakcbone": "resnet50"}}},
    "unknown pipeline section": {"pipeline": {"evaluation": {}}},
    "wrong type: backoffLimit": {"stages": {"train": {"backoffLimit": "two"}}},
    "wrong type: pipeline int": {"pipeline": {"train": {"batch_size": "32"}}},
    "wrong type: on parsed as a boolean": {"pipeline": {"train": {"mixed_precision": True}}},
    "unknown backbone": {"pipeline": {"train": {"backbone": "vgg16"}}},
    "unknown preset": {"pipeline": {"preset": "fast"}},
    "unknown class in augment.exclude": {"pipeline": {"augment": {"exclude": ["nevus"]}}},
    "wrong type: requestGpu": {"pools": {"gpu": {"requestGpu": "yes"}}},
    "GPU in a stage's resources": {"stages": {"prepare": {"resources": {"limits": {GPU: 1}}}}},
    "unknown pool": {"stages": {"evaluate": {"pool": "tpu"}}},
    "invalid run id": {"run": {"id": "Nightly_1"}},
    "bucket with a slash": {"store": {"bucket": "a/b"}},
    "prefix with a leading slash": {"store": {"prefix": "/runs"}},
    "pull policy typo": {"image": {"pullPolicy": "IfNotPresnt"}},
    "misspelled minio key": {"minio": {"enabeld": True}},
    "digest that is a tag": {"image": {"digest": "latest"}},
    "credentials mode typo": {"store": {"credentials": "envv"}},
    "network peer typo": {"networkPolicy": {"store": {"to": [{"podSelecter": {}}]}}},
    "port out of range": {"networkPolicy": {"apiServer": {"ports": [70000]}}},
    "service account key typo": {"serviceAccount": {"stage": {"annotations": {}}}},
}


@pytest.mark.parametrize("what", sorted(BAD_VALUES))
def test_schema_rejects_bad_values(what: str) -> None:
    bad = BAD_VALUES[what]
    with pytest.raises(helm.HelmValuesError):
        cr.render(values=bad)
    assert cr.lint(values=bad)["errors"], f"helm lint accepts {what}"


def test_schema_rejects_a_misspelled_key_in_a_values_file(tmp_path: Path) -> None:
    text = KIND_VALUES.read_text().replace("\nimage:\n", "\nimagee:\n", 1)
    assert "imagee:" in text
    (tmp_path / "values.yaml").write_text(text)
    with pytest.raises(helm.HelmValuesError, match="imagee"):
        cr.render([tmp_path / "values.yaml"])


def _json_type(hint: Any) -> dict[str, Any]:
    if get_origin(hint) is Literal:
        return {"type": "string", "enum": list(get_args(hint))}
    if get_origin(hint) is tuple:
        return {"type": "array"}
    return {"type": {bool: "boolean", int: "integer", float: "number", str: "string"}[hint]}


def test_pipeline_schema_mirrors_config_py() -> None:
    """Every field of PipelineConfig, with its type, and nothing else, in values.schema.json."""
    schema = yaml.safe_load((cr.CHART / "values.schema.json").read_text())
    defs = schema["definitions"]

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        ref = node.get("$ref")
        return defs[ref.rsplit("/", 1)[1]] if ref else node  # type: ignore[no-any-return]

    def check(cls: type, node: dict[str, Any], path: str) -> None:
        node = resolve(node)
        assert node["additionalProperties"] is False, path
        hints = typing.get_type_hints(cls)
        fields = [f.name for f in dataclasses.fields(cls)]
        props = {k: v for k, v in node["properties"].items() if not (path == "" and k == "preset")}
        assert sorted(props) == sorted(fields), path
        for name in fields:
            hint = hints[name]
            if dataclasses.is_dataclass(hint):
                check(hint, props[name], f"{path}{name}.")  # type: ignore[arg-type]
                continue
            expected = _json_type(hint)
            got = {k: props[name][k] for k in expected}
            assert got == expected, f"{path}{name}"

    pipeline = resolve(schema["properties"]["pipeline"])
    check(config.PipelineConfig, pipeline, "")
    assert pipeline["properties"]["preset"]["enum"] == list(config.PRESETS)
    exclude = resolve(pipeline["properties"]["augment"])["properties"]["exclude"]
    assert exclude["items"]["enum"] == list(CLASSES)


def test_generated_chart_parts_are_up_to_date() -> None:
    """The schema's pipeline and stages parts and templates/_stages.tpl are what `make schema`
    generates from skinlesion/config.py and skinlesion/stages.py STAGES."""
    for path, text in chart_schema.generated().items():
        assert path.read_text() == text, f"{path.relative_to(cr.ROOT)} is stale: run make schema"


def test_every_object_in_the_schema_forbids_unknown_keys() -> None:
    schema = yaml.safe_load((cr.CHART / "values.schema.json").read_text())
    free_form = {"nodeAffinity", "podAffinity", "podAntiAffinity"}  # validated by the API

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and path.rsplit("/", 1)[-1] not in free_form:
                assert "additionalProperties" in node, path
            for key, value in node.items():
                walk(value, f"{path}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}/{i}")

    walk(schema, "")


# --- pipeline.yaml and skinlesion/config.py ---------------------------------------------------


def _load_rendered_pipeline(
    rendered: Rendered, preset: str, tmp_path: Path
) -> config.PipelineConfig:
    """What the controller does with --preset and --config (cli.py: load_pipeline)."""
    path = tmp_path / "pipeline.yaml"
    path.write_text(rendered.pipeline_yaml)
    return config.load_pipeline(preset, path)


def test_pipeline_yaml_loads_with_the_python_config(case: Any, tmp_path: Path) -> None:
    _, values, rendered = case
    data = yaml.safe_load(rendered.pipeline_yaml)
    assert set(data) <= {f.name for f in dataclasses.fields(config.PipelineConfig)}
    cfg = config.build(
        config.PipelineConfig,
        data,
        config.build(config.PipelineConfig, config.PRESETS[values["pipeline"]["preset"]]),
    )
    cfg.validate()
    assert cfg == _load_rendered_pipeline(rendered, values["pipeline"]["preset"], tmp_path)


def test_kind_values_use_the_cpu_preset(tmp_path: Path) -> None:
    rendered = cr.render([KIND_VALUES])
    cfg = _load_rendered_pipeline(rendered, "cpu", tmp_path)
    assert cfg == config.load_pipeline("cpu")
    (args,) = [_controller_args(o) for o in rendered.kind("CronJob")]
    assert _flag(args, "--preset") == "cpu"


@pytest.mark.parametrize("preset", sorted(config.PRESETS))
def test_every_config_field_round_trips_through_the_chart(preset: str, tmp_path: Path) -> None:
    """A complete config as values -> rendered pipeline.yaml -> the same config in Python."""
    original = dataclasses.replace(
        config.load_pipeline(preset),
        train=dataclasses.replace(
            config.load_pipeline(preset).train,
            mixed_precision="on",  # YAML 1.1 would read a bare `on` as true
            weights="none",
            finetune_block="conv5_block3",
            finetune_learning_rate=1e-7,  # rendered in exponent form
        ),
        augment=dataclasses.replace(
            config.load_pipeline(preset).augment, exclude=("nv", "df"), target_per_class=2_000_000
        ),
    )
    pipeline = {"preset": "default", **config.to_dict(original)}
    rendered = cr.render(values={"pipeline": pipeline})
    assert _load_rendered_pipeline(rendered, "default", tmp_path) == original


def test_a_value_the_python_config_rejects_is_reported_by_field(tmp_path: Path) -> None:
    """Schema types pass, range checks stay in config.py (one place): the field is named."""
    rendered = cr.render(values={"pipeline": {"prepare": {"val_fraction": 1.5}}})
    with pytest.raises(config.ConfigError, match=r"prepare\.val_fraction"):
        _load_rendered_pipeline(rendered, "default", tmp_path)


# --- NOTES.txt -------------------------------------------------------------------------------


def test_notes_tell_how_to_follow_a_run(case: Any) -> None:
    _, values, rendered = case
    notes = rendered.notes
    assert f"kubectl -n {cr.NAMESPACE} get jobs -l app.kubernetes.io/instance={cr.RELEASE}" in notes
    assert "logs -f job/" in notes
    assert "/evaluate/metrics.json" in notes
    assert rendered.stages["store"] + "/runs/" in notes
    if values["run"]["enabled"]:
        (job,) = rendered.kind("Job")
        assert f"logs -f job/{job['metadata']['name']}" in notes
    else:
        assert "create job --from=cronjob/" + rendered.one("CronJob")["metadata"]["name"] in notes


# --- the Makefile and the Dockerfile ----------------------------------------------------------


def _make_vars() -> dict[str, str]:
    text = cr.MAKEFILE.read_text()
    return dict(re.findall(r"^([A-Z0-9_]+)\s*\?=\s*(.*?)\s*$", text, re.M))


def test_makefile_kind_settings_match_values_kind() -> None:
    make = _make_vars()
    kind = cr.read_values(KIND_VALUES)
    assert make["VALUES"] == "charts/skinlesion/values-kind.yaml"
    assert make["KIND_BUCKET"] == kind["store"]["bucket"]
    assert make["KIND_PREFIX"] == kind["store"]["prefix"]
    assert make["KIND_S3_SECRET"] == kind["store"]["existingSecret"]
    assert kind["minio"]["enabled"] is True
    targets = set(re.findall(r"^([a-z-]+):", cr.MAKEFILE.read_text(), re.M))
    assert {"image", "image-gpu", "kind-up", "deploy", "kind-test"} <= targets


def test_dockerfile_matches_the_chart() -> None:
    text = (cr.ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG TF_VARIANT=cpu$", text, re.M)  # make image-gpu: TF_VARIANT=gpu
    assert 'tf="tensorflow[and-cuda]"' in text
    assert "TF_VARIANT=gpu" in cr.MAKEFILE.read_text()
    assert re.search(rf"^USER {UID}(:{UID})?$", text, re.M)
    assert re.search(r"^WORKDIR /app$", text, re.M)
    assert "COPY jobs/ /app/jobs/" in text  # the chart runs python /app/jobs/<job>.py
    rendered = cr.render()
    assert (
        rendered.stage_jobs()["prepare"]["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
        == UID
    )
    ignored = (cr.ROOT / ".dockerignore").read_text().split()
    for path in (".venv", "store", "tests", "build", ".git"):
        assert path in ignored


def test_constraints_pin_the_tested_environment() -> None:
    """make run, make test and the image install exactly the versions the tests ran with
    (regenerate on drift: `make lock`)."""
    pins = lockfile.read()
    assert pins["runtime"] == lockfile.runtime_pins()
    assert pins["extras"] == lockfile.extras_pins()
    assert pins["dev"] == lockfile.dev_pins()
    assert "tensorflow" in pins["runtime"] and "pytest" in pins["dev"]
    assert "mlflow-skinny" in pins["extras"] and "mlflow" in pins["dev"]
    assert "nvidia-cudnn-cu12" in pins["gpu"]
    assert not set(pins["runtime"]) & set(pins["gpu"])
    assert not set(pins["runtime"]) & set(pins["dev"])
    assert not (set(pins["runtime"]) | set(pins["dev"])) & set(pins["extras"])
