"""The chart's observability values: Pushgateway URL, webhook Secret, extra egress, the
Grafana dashboard and PrometheusRule, MLflow's URI, credentials and egress."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from skinlesion.kube_jobs import LABEL_ATTEMPT
from skinlesion.obs import mlflow_log, pushgateway
from skinlesion.obs.pushgateway import ATTEMPT_ENV, PUSHGATEWAY_ENV
from skinlesion.obs.webhook import WEBHOOK_ENV
from tests import chart_render as cr
from tests import obs_servers
from tests.chart_render import containers, pod_spec

URL = "http://pushgateway.monitoring:9091"
OBS = {
    "metrics": {"pushgateway": {"url": URL}},
    "notify": {"webhookUrl": {"existingSecret": "slack-hook", "key": "hook"}},
}


def _envs(overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Container name -> its env by variable name, for every stage and controller container."""
    out: dict[str, dict[str, Any]] = {}
    for name, obj in cr.render([], overrides).workloads():
        spec = pod_spec(obj)
        assert spec is not None
        for c in containers(spec):
            if c["name"] in ("stage", "controller"):
                out[f"{name}/{c['name']}"] = {e["name"]: e for e in c.get("env", [])}
    return out


def test_pushgateway_url_reaches_stage_and_controller_pods_webhook_only_the_controller() -> None:
    envs = _envs(OBS)
    kinds = {key.rsplit("/", 1)[1] for key in envs}
    assert kinds == {"stage", "controller"}
    for key, env in envs.items():
        assert env[PUSHGATEWAY_ENV]["value"] == URL, key
        if key.endswith("/stage"):
            assert env[ATTEMPT_ENV]["valueFrom"]["fieldRef"]["fieldPath"] == (
                f"metadata.labels['{LABEL_ATTEMPT}']"
            )
            assert WEBHOOK_ENV not in env, key
        else:
            ref = env[WEBHOOK_ENV]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "slack-hook", "key": "hook"}, key
            assert "value" not in env[WEBHOOK_ENV]


def test_observability_is_off_by_default() -> None:
    for key, env in _envs({}).items():
        assert not {PUSHGATEWAY_ENV, ATTEMPT_ENV, WEBHOOK_ENV} & set(env), key


def test_extra_egress_is_appended_to_both_policies() -> None:
    rule = {
        "ports": [{"protocol": "TCP", "port": 9091}],
        "to": [{"ipBlock": {"cidr": "10.9.0.0/16"}}],
    }
    rendered = cr.render([], {"networkPolicy": {"extraEgress": [rule]}})
    for who in ("stages", "controller"):
        assert rendered.one("NetworkPolicy", who)["spec"]["egress"][-1] == rule


def test_schema_refuses_a_pushgateway_url_without_http_and_a_keyless_secret() -> None:

    with pytest.raises(Exception, match="url"):
        cr.render([], {"metrics": {"pushgateway": {"url": "pushgateway:9091"}}})
    with pytest.raises(Exception, match="key"):
        cr.render([], {"notify": {"webhookUrl": {"existingSecret": "s", "key": ""}}})


# --- Grafana dashboard and PrometheusRule -------------------------------------------------

DASHBOARD = cr.CHART / "dashboards" / "skinlesion.json"
ON = {"grafana": {"dashboard": {"enabled": True}}, "prometheusRule": {"enabled": True}}
_NAME = re.compile(r"\bskinlesion_[a-z_]+\b")


def _dashboard_cm(rendered: cr.Rendered) -> list[dict[str, Any]]:
    return [o for o in rendered.kind("ConfigMap") if "grafana_dashboard" in o["metadata"]["labels"]]


def _exprs(panels: list[dict[str, Any]]) -> list[str]:
    out = []
    for panel in panels:
        out += [t["expr"] for t in panel.get("targets", [])]
        out += _exprs(panel.get("panels", []))
    return out


def pushed_metric_names(base: str) -> set[str]:
    """Every metric family the code pushes, read back from a real Pushgateway: one stage
    exit push with every evaluate figure noted and one run push."""
    pushgateway.note_manifest({"metrics": dict.fromkeys(pushgateway.EVAL_METRICS, 0.5)})
    pushgateway.note(images=10)
    assert pushgateway.push_stage("evaluate", "dash", 0, 2.0)
    assert pushgateway.push_run("dash", "succeeded", 3.0, 6)
    text = obs_servers.scrape(base)
    return {
        m for line in text.splitlines() if not line.startswith("#") for m in _NAME.findall(line)
    }


def test_dashboard_and_rule_are_off_by_default() -> None:
    rendered = cr.render([], {})
    assert not _dashboard_cm(rendered)
    assert not rendered.kind("PrometheusRule")


def test_dashboard_configmap_is_valid_and_carries_the_chart_file() -> None:
    rendered = cr.render([], {**ON, "grafana": {"dashboard": {
        "enabled": True, "annotations": {"grafana_folder": "ML"}}}})  # fmt: skip
    (cm,) = _dashboard_cm(rendered)
    for version in cr.KUBE_VERSIONS:
        cr.validate(cm, version)
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "ML"}
    board = json.loads(cm["data"]["skinlesion.json"])
    assert board == json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "run_id"} <= variables
    assert not cr.lint([], ON)["errors"]


def test_dashboard_queries_use_exactly_the_pushed_metric_names(
    pushgateway_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PUSHGATEWAY_ENV, pushgateway_url)
    pushed = pushed_metric_names(pushgateway_url)
    assert "skinlesion_run_last_success_timestamp_seconds" in pushed  # the derivation works
    board = json.loads(DASHBOARD.read_text())
    used = {m for expr in _exprs(board["panels"]) for m in _NAME.findall(expr)}
    queried = {m for v in board["templating"]["list"] for m in _NAME.findall(json.dumps(v))}
    assert used == pushed, f"not pushed: {used - pushed}; not shown: {pushed - used}"
    assert queried <= pushed
    (rule,) = cr.render([], ON).kind("PrometheusRule")
    exprs = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
    assert {m for e in exprs for m in _NAME.findall(e)} <= pushed


def test_prometheus_rule_alerts_after_stale_days() -> None:
    values = {**ON, "prometheusRule": {
        "enabled": True, "staleDays": 3, "for": "2h", "labels": {"release": "kps"}}}  # fmt: skip
    (rule,) = cr.render([], values).kind("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["namespace"] == cr.NAMESPACE
    assert rule["metadata"]["labels"]["release"] == "kps"
    (group,) = rule["spec"]["groups"]
    assert set(group) == {"name", "rules"}
    (alert,) = group["rules"]
    assert set(alert) == {"alert", "expr", "for", "labels", "annotations"}
    assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", alert["alert"])
    assert alert["expr"] == (
        "time() - max(skinlesion_run_last_success_timestamp_seconds) > 259200"  # 3 days
    )
    assert alert["for"] == "2h" and alert["labels"] == {"severity": "warning"}
    assert "3 days" in alert["annotations"]["summary"]
    assert "{{ $value | humanizeDuration }}" in alert["annotations"]["description"]
    with pytest.raises(Exception, match="staleDays"):
        cr.render([], {"prometheusRule": {"staleDays": 0}})


# --- MLflow -------------------------------------------------------------------------------

MLFLOW = {"mlflow": {"trackingUri": "https://mlflow.example:5443", "existingSecret": "mlflow-cred"}}


def test_mlflow_env_and_credentials_reach_stage_and_controller_pods() -> None:
    envs = _envs(MLFLOW)
    assert {key.rsplit("/", 1)[1] for key in envs} == {"stage", "controller"}
    for key, env in envs.items():
        assert env[mlflow_log.TRACKING_ENV]["value"] == "https://mlflow.example:5443", key
        assert env[mlflow_log.EXPERIMENT_ENV]["value"] == "skinlesion", key
        assert env[mlflow_log.MODEL_ENV]["value"] == "skinlesion", key
        for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            assert env[var]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-cred", "key": var}
            assert "value" not in env[var]
    for key, env in _envs({"mlflow": {"trackingUri": "http://mlflow:5000"}}).items():
        assert "MLFLOW_TRACKING_PASSWORD" not in env, key  # no Secret: no credentials
    for key, env in _envs({}).items():
        assert mlflow_log.TRACKING_ENV not in env, key


def test_mlflow_egress_follows_the_tracking_uri() -> None:
    def last_rule(values: dict[str, Any], who: str = "stages") -> dict[str, Any]:
        return cr.render([], values).one("NetworkPolicy", who)["spec"]["egress"][-1]

    for who in ("stages", "controller"):
        egress = cr.render([], MLFLOW).one("NetworkPolicy", who)["spec"]["egress"]
        assert {"ports": [{"protocol": "TCP", "port": 5443}]} in egress, who
    assert last_rule({"mlflow": {"trackingUri": "https://mlflow.example"}}) == {
        "ports": [{"protocol": "TCP", "port": 443}]
    }
    peer = [{"ipBlock": {"cidr": "10.1.0.0/16"}}]
    pinned = {"mlflow": {"trackingUri": "http://m"}, "networkPolicy": {"mlflow": {
        "to": peer, "ports": [8080]}}}  # fmt: skip
    assert last_rule(pinned) == {"ports": [{"protocol": "TCP", "port": 8080}], "to": peer}
    default = cr.render([], {}).one("NetworkPolicy", "stages")["spec"]["egress"]
    assert len(default) == 2  # DNS and the store only: MLflow off
    for obj in cr.render([], MLFLOW).kind("NetworkPolicy"):
        for version in cr.KUBE_VERSIONS:
            cr.validate(obj, version)
