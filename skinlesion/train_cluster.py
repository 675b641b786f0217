"""The pods of a multi-worker training stage (an Indexed Job with a headless Service):
who they are, from the variables the chart gives each pod, and their TF_CONFIG.

Pure Python (no TensorFlow): the CLI reads the variables at the edge and passes the
`Cluster` down; `train_runtime` builds MultiWorkerMirroredStrategy from it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from skinlesion.errors import ConfigError

WORKER_PORT = 2222


@dataclass(frozen=True)
class Cluster:
    """The pods of a multi-worker stage: worker `index` of `hosts` ("host:port")."""

    hosts: tuple[str, ...]
    index: int

    @property
    def chief(self) -> bool:
        return self.index == 0

    def tf_config(self) -> str:
        """The TF_CONFIG of this worker (worker 0 is the chief)."""
        return json.dumps(
            {
                "cluster": {"worker": list(self.hosts)},
                "task": {"type": "worker", "index": self.index},
            }
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Cluster | None:
        """The cluster of an Indexed Job's pod from its variables (the chart sets them):
        SKINLESION_WORKERS, SKINLESION_WORKER_SERVICE (the headless Service),
        SKINLESION_STAGE_JOB (the Job's name), JOB_COMPLETION_INDEX (Kubernetes). None
        for one worker."""
        workers = int(env.get("SKINLESION_WORKERS") or "1")
        if workers <= 1:
            return None
        try:
            index = int(env["JOB_COMPLETION_INDEX"])
            job, service = env["SKINLESION_STAGE_JOB"], env["SKINLESION_WORKER_SERVICE"]
        except (KeyError, ValueError) as exc:
            raise ConfigError(
                "workers", f"{workers} workers need the Indexed Job's variables ({exc})"
            ) from None
        if not 0 <= index < workers:
            raise ConfigError("workers", f"completion index {index} outside 0..{workers - 1}")
        port = int(env.get("SKINLESION_WORKER_PORT") or WORKER_PORT)
        # Pods of an Indexed Job are named <job>-<index>; the Service gives them DNS names.
        hosts = tuple(f"{job}-{i}.{service}:{port}" for i in range(workers))
        return cls(hosts, index)
