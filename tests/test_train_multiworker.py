"""Multi-worker training (the Indexed Job of `stages.train.workers`): two worker processes
on this machine train one phase together with MultiWorkerMirroredStrategy; only the chief
writes the stage's output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from skinlesion.manifest import read_owner
from skinlesion.storage import Store, get_json, open_store
from tests import s3server
from tests.test_train import ROOT, write_prepared

_WORKER = """
import json, sys
from skinlesion import logs, train
from skinlesion.storage import open_store
from skinlesion.train_cluster import Cluster
from tests.test_train import tiny_cfg

logs.configure()
data, out = open_store(sys.argv[1]), open_store(sys.argv[2])
cluster = Cluster(tuple(sys.argv[4].split(",")), int(sys.argv[3]))
m = train.run_train(tiny_cfg(top_epochs=2), "top", data, data, out, cluster=cluster)
print(json.dumps({k: m[k] for k in ("fingerprint", "replicas", "epochs_run", "created_at")}))
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Store:
    store = open_store(str(tmp_path_factory.mktemp("mw") / "prepare"))
    write_prepared(store)
    return store


@pytest.mark.slow
def test_two_workers_train_together_and_only_the_chief_writes(data: Store, tmp_path: Path) -> None:
    out = open_store(str(tmp_path / "train"))
    hosts = ",".join(f"localhost:{p}" for p in s3server.free_ports(2))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, data.uri, out.uri, str(i), hosts],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(2)
    ]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=1200)  # a hang guard only
        assert proc.returncode == 0, stderr.decode()[-3000:]
        results.append(json.loads(stdout.decode().strip().splitlines()[-1]))
    chief, worker = results
    assert chief["replicas"] == worker["replicas"] == 2  # one strategy over both processes
    assert chief["fingerprint"] == worker["fingerprint"]
    assert chief["epochs_run"] == worker["epochs_run"] == 2
    manifest = get_json(out, "manifest.json")
    assert manifest["created_at"] == chief["created_at"]
    owner = read_owner(out)
    assert owner is not None and owner["pid"] == procs[0].pid  # the chief wrote the output
    assert not out.list("state")
