"""A pod spec as a `docker run` command line, honouring what a kubelet honours.

`container_command(pod, sources, directory, session)` returns the arguments and the
environment of one `docker run -d` of the pod's single container:

- the image as named, with `imagePullPolicy` (no registry here: the image must be local);
- `command` -> `--entrypoint` + its tail, `args` after it (the image's CMD replaced, as
  Kubernetes does); `$(VAR)` references expanded from the container's environment;
- `env` (value, `secretKeyRef`, `configMapKeyRef`, `fieldRef`) and `envFrom`, resolved from
  the emulator's objects, plus the `KUBERNETES_SERVICE_*` variables a kubelet always sets;
  values travel in the docker client's environment (`-e NAME`), never on its command line;
- the pod and container security context: runAsUser/runAsGroup (`--user`), fsGroup and
  supplementalGroups (`--group-add`), runAsNonRoot (checked against the image's user),
  readOnlyRootFilesystem (`--read-only`), capabilities (`--cap-drop/--cap-add`),
  allowPrivilegeEscalation false (`no-new-privileges`), the seccomp profile
  (RuntimeDefault: Docker's default profile; none set: unconfined, the kubelet's default);
- volumes: emptyDir (tmpfs of its sizeLimit), ConfigMap and Secret (files written with
  their modes, group fsGroup, mounted read-only), and the ServiceAccount's token, CA and
  namespace at /var/run/secrets/kubernetes.io/serviceaccount unless automounting is off
  (the pod's `automountServiceAccountToken`, else the ServiceAccount's);
- resources: limits.memory (`--memory`, no swap), limits.cpu (`--cpus`), requests.cpu
  (`--cpu-shares`); requests.memory only schedules; GPUs are refused (none here);
- `--network host`, `--hostname <pod>` (HOSTNAME), `workingDir`.

Anything else in the spec (init or extra containers, probes, hostPath or PVC volumes,
subPath, ...) raises PodConfigError naming it: this kubelet never pretends to run a spec it
cannot honour. A missing Secret, ConfigMap, key or ServiceAccount raises it too (a real
kubelet would leave the pod in CreateContainerConfigError).
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skinlesion.kube_jobs import parse_quantity
from tests import docker_engine

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
NODE_LABELS = {"kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}
POD_FIELDS = {
    "containers", "restartPolicy", "serviceAccountName", "serviceAccount",
    "automountServiceAccountToken", "enableServiceLinks", "terminationGracePeriodSeconds",
    "securityContext", "volumes", "nodeName", "nodeSelector", "tolerations",
    "imagePullSecrets", "dnsPolicy", "schedulerName", "priorityClassName",
}  # fmt: skip
CONTAINER_FIELDS = {
    "name", "image", "imagePullPolicy", "command", "args", "env", "envFrom", "resources",
    "securityContext", "volumeMounts", "workingDir", "ports", "terminationMessagePath",
    "terminationMessagePolicy",
}  # fmt: skip


class PodConfigError(RuntimeError):
    """The pod cannot be run as specified (or not by this kubelet): the message says why."""


@dataclass(frozen=True)
class PodSources:
    """What the kubelet reads besides the pod: the namespace's objects and the node's."""

    secrets: Mapping[str, dict[str, Any]]
    config_maps: Mapping[str, dict[str, Any]]
    service_accounts: Mapping[str, dict[str, Any]]
    images: Callable[[str], bool]  # is this image on the node?
    token_for: Callable[[str, str], str]  # (namespace, service account) -> bearer token
    ca_cert: str
    api_port: int


@dataclass(frozen=True)
class Command:
    container: str
    argv: list[str]  # after `docker`
    env: dict[str, str]  # the docker client's environment (values of `-e NAME`)
    memory_limit: str | None


def _data(obj: dict[str, Any], secret: bool) -> dict[str, str]:
    """A Secret's or ConfigMap's data as text (what the API server stores for stringData)."""
    if not secret:
        return {str(k): str(v) for k, v in (obj.get("data") or {}).items()}
    data = {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
    return {**data, **(obj.get("stringData") or {})}


def _key_ref(ref: dict[str, Any], objects: Mapping[str, dict[str, Any]], kind: str) -> str | None:
    obj = objects.get(ref["name"])
    if obj is None:
        if ref.get("optional"):
            return None
        raise PodConfigError(f'{kind} "{ref["name"]}" not found')
    data = _data(obj, secret=kind == "secret")
    if ref["key"] not in data:
        if ref.get("optional"):
            return None
        raise PodConfigError(f"couldn't find key {ref['key']} in {kind} {ref['name']}")
    return data[ref["key"]]


_FIELD = re.compile(r"^metadata\.(labels|annotations)\['([^']+)'\]$")


def field_value(pod: dict[str, Any], path: str) -> str:
    meta = pod["metadata"]
    m = _FIELD.match(path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    simple = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": pod["spec"].get("nodeName", ""),
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
        "status.hostIP": "127.0.0.1",
        "status.podIP": "127.0.0.1",
    }
    if path not in simple:
        raise PodConfigError(f"fieldRef {path!r} is not emulated")
    return str(simple[path])


_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined variables replaced, $$ escapes, others kept."""

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _REF.sub(one, text)


def _cpu(text: str) -> float:
    text = str(text)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _merged_security(pod_ctx: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    keys = ("runAsUser", "runAsGroup", "runAsNonRoot", "seccompProfile")
    merged = {k: pod_ctx[k] for k in keys if k in pod_ctx}
    merged.update(ctx)
    return merged


def _image_user(image: str) -> str:
    return docker_engine.docker(
        "image", "inspect", "--format", "{{.Config.User}}", image
    ).stdout.strip()


def _write_files(
    root: Path,
    data: Mapping[str, str],
    items: list[dict[str, Any]] | None,
    mode: int,
    gid: int | None,
) -> None:
    root.mkdir(parents=True)
    chosen = items or [{"key": k, "path": k} for k in data]
    for item in chosen:
        if item["key"] not in data:
            raise PodConfigError(f"volume item key {item['key']!r} not found")
        path = root / item["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(data[item["key"]])
        os.chmod(path, int(item.get("mode", mode)))
        if gid is not None:
            os.chown(path, 0, gid)


def container_command(
    pod: dict[str, Any], sources: PodSources, directory: Path, session: str
) -> Command:
    spec, meta = pod["spec"], pod["metadata"]
    unknown = set(spec) - POD_FIELDS
    if unknown:
        raise PodConfigError(f"pod fields not emulated: {sorted(unknown)}")
    if spec.get("restartPolicy", "Always") != "Never":
        raise PodConfigError(f"restartPolicy {spec.get('restartPolicy')!r}: only Never is emulated")
    if len(spec["containers"]) != 1:
        raise PodConfigError("only pods with one container are emulated")
    wanted = spec.get("nodeSelector") or {}
    if any(NODE_LABELS.get(k) != v for k, v in wanted.items()):
        raise PodConfigError(f"unschedulable: nodeSelector {wanted} matches no node")
    (c,) = spec["containers"]
    unknown = set(c) - CONTAINER_FIELDS
    if unknown:
        raise PodConfigError(f"container fields not emulated: {sorted(unknown)}")
    namespace, name = meta["namespace"], meta["name"]
    container = f"k8s_{c['name']}_{name}_{namespace}_{session}"
    image = c["image"]
    policy = c.get("imagePullPolicy", "IfNotPresent")
    if policy == "Always" or not sources.images(image):
        raise PodConfigError(
            f"image {image} (imagePullPolicy {policy}) cannot be pulled: no registry here, "
            "and the image is " + ("local" if sources.images(image) else "not on the node")
        )
    argv = ["run", "-d", "--name", container, "--label", f"skinlesion.test.kubelet={session}"]
    argv += ["--label", f"io.kubernetes.pod.name={name}", "--network", "host", "--hostname", name]

    # identity and security
    pod_ctx = spec.get("securityContext") or {}
    ctx = _merged_security(pod_ctx, c.get("securityContext") or {})
    unknown_ctx = set(ctx) - {
        "runAsUser", "runAsGroup", "runAsNonRoot", "seccompProfile", "readOnlyRootFilesystem",
        "allowPrivilegeEscalation", "capabilities", "privileged",
    }  # fmt: skip
    if unknown_ctx:
        raise PodConfigError(f"securityContext fields not emulated: {sorted(unknown_ctx)}")
    uid, gid = ctx.get("runAsUser"), ctx.get("runAsGroup")
    if ctx.get("runAsNonRoot"):
        effective = str(uid) if uid is not None else _image_user(image).split(":")[0]
        if not effective.isdigit():
            raise PodConfigError(
                f"container has runAsNonRoot and image has non-numeric user ({effective!r})"
            )
        if int(effective) == 0:
            raise PodConfigError("container has runAsNonRoot and image will run as root")
    if uid is not None:
        argv += ["--user", f"{uid}:{gid}" if gid is not None else str(uid)]
    fs_group = pod_ctx.get("fsGroup")
    for group in [fs_group, *(pod_ctx.get("supplementalGroups") or [])]:
        if group is not None:
            argv += ["--group-add", str(group)]
    if ctx.get("privileged"):
        raise PodConfigError("privileged containers are not emulated")
    if ctx.get("readOnlyRootFilesystem"):
        argv.append("--read-only")
    caps = ctx.get("capabilities") or {}
    argv += [a for cap in caps.get("drop") or [] for a in ("--cap-drop", cap)]
    argv += [a for cap in caps.get("add") or [] for a in ("--cap-add", cap)]
    if ctx.get("allowPrivilegeEscalation") is False:
        argv += ["--security-opt", "no-new-privileges"]
    seccomp = (ctx.get("seccompProfile") or {}).get("type", "Unconfined")
    if seccomp == "Unconfined":
        argv += ["--security-opt", "seccomp=unconfined"]
    elif seccomp != "RuntimeDefault":
        raise PodConfigError(f"seccompProfile {seccomp} is not emulated")

    # resources
    resources = c.get("resources") or {}
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
    extra = (set(limits) | set(requests)) - {"cpu", "memory", "ephemeral-storage"}
    if extra:
        raise PodConfigError(f"resources {sorted(extra)}: no such device on this node")
    memory_limit = None
    if "memory" in limits:
        memory_limit = str(limits["memory"])
        size = str(parse_quantity(memory_limit))
        argv += ["--memory", size, "--memory-swap", size]
    if "cpu" in limits:
        argv += ["--cpus", f"{_cpu(limits['cpu']):g}"]
    if "cpu" in requests or "cpu" in limits:
        shares = max(2, int(_cpu(requests.get("cpu", limits.get("cpu"))) * 1024))
        argv += ["--cpu-shares", str(shares)]

    # volumes
    directory.mkdir(parents=True, exist_ok=True)
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    for mount in c.get("volumeMounts") or []:
        if "subPath" in mount or "subPathExpr" in mount:
            raise PodConfigError(f"volumeMount {mount['name']}: subPath is not emulated")
        volume = volumes.get(mount["name"])
        if volume is None:
            raise PodConfigError(f"volumeMount {mount['name']!r} names no volume")
        path, read_only = mount["mountPath"], bool(mount.get("readOnly"))
        if "emptyDir" in volume:
            # an emptyDir is world-writable; with fsGroup, group-owned and setgid
            options = ["ro" if read_only else "rw", "exec", "nosuid", "nodev"]
            if fs_group is not None:
                options += [f"gid={fs_group}", "mode=2777"]
            else:
                options.append("mode=0777")
            limit = (volume["emptyDir"] or {}).get("sizeLimit")
            if limit:
                options.append(f"size={parse_quantity(str(limit))}")
            argv += ["--tmpfs", f"{path}:{','.join(options)}"]
        elif "configMap" in volume or "secret" in volume:
            secret = "secret" in volume
            source = volume["secret" if secret else "configMap"]
            ref = source.get("secretName" if secret else "name")
            obj = (sources.secrets if secret else sources.config_maps).get(ref)
            if obj is None:
                if source.get("optional"):
                    obj = {}
                else:
                    kind = "secret" if secret else "configmap"
                    raise PodConfigError(f'volume {mount["name"]}: {kind} "{ref}" not found')
            host = directory / "volumes" / mount["name"]
            _write_files(
                host,
                _data(obj, secret),
                source.get("items"),
                int(source.get("defaultMode", 0o644)),
                fs_group,
            )
            argv += ["-v", f"{host}:{path}:ro"]  # configMap and secret volumes are read-only
        else:
            kinds = sorted(set(volume) - {"name"})
            raise PodConfigError(f"volume {mount['name']}: {kinds} volumes are not emulated")

    # the ServiceAccount and its token
    sa_name = spec.get("serviceAccountName") or "default"
    account = sources.service_accounts.get(sa_name)
    if account is None:
        raise PodConfigError(
            f"error looking up service account {namespace}/{sa_name}: serviceaccount "
            f'"{sa_name}" not found'
        )
    automount = spec.get("automountServiceAccountToken")
    if automount is None:
        automount = account.get("automountServiceAccountToken", True)
    if automount:
        token_dir = directory / "serviceaccount"
        files = {
            "token": sources.token_for(namespace, sa_name),
            "ca.crt": sources.ca_cert,
            "namespace": namespace,
        }
        _write_files(token_dir, files, None, 0o644, fs_group)
        argv += ["-v", f"{token_dir}:{SA_DIR}:ro"]

    # environment: the kubelet's service variables, envFrom, env (in order, $(VAR) expanded)
    env: dict[str, str] = {
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(sources.api_port),
        "KUBERNETES_SERVICE_PORT_HTTPS": str(sources.api_port),
        "KUBERNETES_PORT": f"tcp://127.0.0.1:{sources.api_port}",
    }
    for source in c.get("envFrom") or []:
        prefix = source.get("prefix", "")
        ref = source.get("secretRef") or source.get("configMapRef") or {}
        secret = "secretRef" in source
        obj = (sources.secrets if secret else sources.config_maps).get(ref.get("name"))
        if obj is None:
            if ref.get("optional"):
                continue
            raise PodConfigError(
                f"envFrom: {'secret' if secret else 'configmap'} {ref.get('name')!r} not found"
            )
        env.update({prefix + k: v for k, v in _data(obj, secret).items()})
    for var in c.get("env") or []:
        source = var.get("valueFrom")
        if source is None:
            value: str | None = expand(str(var.get("value", "")), env)
        elif "secretKeyRef" in source:
            value = _key_ref(source["secretKeyRef"], sources.secrets, "secret")
        elif "configMapKeyRef" in source:
            value = _key_ref(source["configMapKeyRef"], sources.config_maps, "configmap")
        elif "fieldRef" in source:
            value = field_value(pod, source["fieldRef"]["fieldPath"])
        else:
            raise PodConfigError(f"env {var['name']}: {sorted(source)} is not emulated")
        if value is not None:
            env[var["name"]] = value
    for key in env:
        argv += ["-e", key]
    if c.get("workingDir"):
        argv += ["--workdir", c["workingDir"]]

    command = [expand(str(a), env) for a in c.get("command") or []]
    args = [expand(str(a), env) for a in c.get("args") or []]
    if command:
        argv += ["--entrypoint", command[0], image, *command[1:], *args]
    else:
        argv += [image, *args]
    client_env = {
        k: v for k, v in os.environ.items() if k in ("PATH", "DOCKER_HOST", "DOCKER_CONFIG")
    }
    (directory / "docker-run.json").write_text(
        json.dumps({"argv": argv, "env": sorted(env)}, indent=1)
    )
    return Command(container, argv, {**client_env, **env}, memory_limit)
