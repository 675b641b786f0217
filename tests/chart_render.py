"""Render and lint the Helm chart offline, as `helm template` / `helm lint` would.

Uses Helm's Go SDK through PyPI `helm-python-sdk` (no helm binary, no cluster) and
checks objects with PyPI `kubernetes-validate` against a pinned Kubernetes version.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "skinlesion"
MAKEFILE = ROOT / "Makefile"
# Pinned Kubernetes versions for kubernetes-validate: the oldest the chart supports
# (Chart.yaml kubeVersion; podFailurePolicy and CronJob timeZone on by default) and the
# one of current kind node images.
KUBE_VERSIONS = ("1.29.0", "1.33.0")
RELEASE = "skinlesion"
NAMESPACE = "skinlesion"

Obj = dict[str, Any]


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Helm's merge of several values files: maps merge, anything else replaces, null deletes."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_values(path: str | Path) -> dict[str, Any]:
    data = yaml.safe_load(Path(path).read_text()) or {}
    assert isinstance(data, dict), f"{path}: top level must be a mapping"
    return data


def makefile_values_files() -> list[Path]:
    """Every chart values file the Makefile's Kubernetes targets refer to."""
    names = set(re.findall(r"charts/skinlesion/(values[\w.-]*\.ya?ml)", MAKEFILE.read_text()))
    return sorted(CHART / n for n in names)


@cache
def _chart() -> helm.Chart:
    return helm.Chart.load(str(CHART))


@dataclass
class Rendered:
    """The objects of one `helm template`, plus NOTES.txt and the stage shapes."""

    objects: list[Obj]
    notes: str
    sources: dict[str, str] = field(default_factory=dict)  # template path -> text

    def kind(self, kind: str) -> list[Obj]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, component: str | None = None) -> Obj:
        found = [
            o
            for o in self.kind(kind)
            if component is None
            or o["metadata"]["labels"].get("app.kubernetes.io/component") == component
        ]
        assert len(found) == 1, f"expected one {kind} ({component}), found {len(found)}"
        return found[0]

    @property
    def stages_configmap(self) -> Obj:
        (cm,) = [o for o in self.kind("ConfigMap") if o["metadata"]["name"].endswith("-stages")]
        return cm

    @property
    def pipeline_yaml(self) -> str:
        return str(self.stages_configmap["data"]["pipeline.yaml"])

    @property
    def stages(self) -> dict[str, Any]:
        data = yaml.safe_load(self.stages_configmap["data"]["stages.yaml"])
        assert isinstance(data, dict)
        return data

    def stage_jobs(self) -> dict[str, Obj]:
        """The Job shape of each stage, from stages.yaml in the ConfigMap."""
        return {name: s["job"] for name, s in self.stages["stages"].items()}

    def workloads(self) -> list[tuple[str, Obj]]:
        """Every object that runs pods: rendered ones and the embedded stage Jobs."""
        named = [(f"{o['kind']}/{o['metadata']['name']}", o) for o in self.objects]
        embedded = [(f"stages.yaml/{n}", j) for n, j in self.stage_jobs().items()]
        return [(n, o) for n, o in named + embedded if pod_spec(o) is not None]


def pod_spec(obj: Obj) -> Obj | None:
    """The pod spec of a Job, CronJob or Deployment; None for other kinds."""
    kind = obj.get("kind")
    if kind in ("Job", "Deployment", "StatefulSet", "DaemonSet"):
        return obj["spec"]["template"]["spec"]  # type: ignore[no-any-return]
    if kind == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]  # type: ignore[no-any-return]
    return None


def job_spec(obj: Obj) -> Obj | None:
    """The Job spec of a Job or a CronJob's jobTemplate."""
    if obj.get("kind") == "Job":
        return obj["spec"]  # type: ignore[no-any-return]
    if obj.get("kind") == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]  # type: ignore[no-any-return]
    return None


def containers(spec: Obj) -> Iterator[Obj]:
    yield from spec.get("initContainers", [])
    yield from spec.get("containers", [])


def merged_values(
    values_files: Sequence[str | Path] = (), values: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The user values of `-f file ... --set ...` (before the chart's defaults)."""
    merged: dict[str, Any] = {}
    for path in values_files:
        merged = deep_merge(merged, read_values(path))
    return deep_merge(merged, values or {})


def render(
    values_files: Sequence[str | Path] = (),
    values: Mapping[str, Any] | None = None,
    *,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
    revision: int = 1,
) -> Rendered:
    """`helm template <release> charts/skinlesion -n <ns> -f <files> --set <values>`.

    Raises helm_python.HelmValuesError when the values break values.schema.json.
    """
    user = merged_values(values_files, values)
    manifests = _chart().render(
        user, name=release, namespace=namespace, revision=revision, is_install=True
    )
    objects: list[Obj] = []
    notes = ""
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return Rendered(objects, notes, manifests)


def lint(
    values_files: Sequence[str | Path] = (), values: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """`helm lint --strict` with these values: {"messages": [...], "errors": [...]}."""
    return helm.lint(
        str(CHART),
        merged_values(values_files, values),
        strict=True,
        namespace=NAMESPACE,
        kube_version=f"v{KUBE_VERSIONS[0]}",
    )


def validate(obj: Obj, kube_version: str) -> None:
    """`kubernetes-validate --strict` of one object (unknown fields are errors).

    Raises kubernetes_validate.ValidationError, or SchemaNotFoundError for an unknown kind.
    """
    kubernetes_validate.validate(obj, kube_version, strict=True)
