"""The chart's observability values: Pushgateway URL, webhook Secret, extra egress."""

from __future__ import annotations

from typing import Any

import pytest

from skinlesion.kube_jobs import LABEL_ATTEMPT
from skinlesion.obs.pushgateway import ATTEMPT_ENV, PUSHGATEWAY_ENV
from skinlesion.obs.webhook import WEBHOOK_ENV
from tests import chart_render as cr
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
