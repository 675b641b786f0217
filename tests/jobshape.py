"""The stage Job shape the controller tests and the hand-off benchmark hand to the
controller in their stages file (what the chart renders, for the emulator)."""

from __future__ import annotations

from typing import Any

from skinlesion.stages import STAGE_BY_NAME

Obj = dict[str, Any]


def stage_job(stage: str, namespace: str, release: str, image: str = "skinlesion:test") -> Obj:
    """A stage Job shape as the chart renders it: complete, without name and args."""
    s = STAGE_BY_NAME[stage]
    labels = {
        "app.kubernetes.io/name": "skinlesion",
        "app.kubernetes.io/instance": release,
        "app.kubernetes.io/component": stage,
    }
    resources: dict[str, Any] = {"requests": {"cpu": "1", "memory": "2Gi"}}
    if s.pool == "gpu":
        resources["limits"] = {"nvidia.com/gpu": 1}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"namespace": namespace, "labels": labels},
        "spec": {
            "backoffLimit": 1,
            "activeDeadlineSeconds": 3600,
            "ttlSecondsAfterFinished": 86400,
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "Ignore",
                        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                    },
                    {
                        "action": "FailJob",
                        "onExitCodes": {"containerName": "stage", "operator": "In", "values": [2]},
                    },
                ]
            },
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "stage",
                            "image": image,
                            "command": ["python", f"/app/jobs/{s.job}.py"],
                            "resources": resources,
                        }
                    ],
                },
            },
        },
    }
