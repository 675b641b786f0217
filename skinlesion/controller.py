"""`skinlesion controller`: one run of the stage list as Kubernetes Jobs, in order.

The ordering, skip-if-done, retries and preemption handling are the shared loop of
`pipeline.run_pipeline`; this module only wires it up: the stages file and the run id,
the run's Lease (`lease`: a second controller for the same run id is refused), and the
executor that runs one stage as a Job (`kube_executor`). SIGTERM (errors.Terminated)
deletes the running Job, releases the Lease and ends with exit code 143 (the CLI maps
it); the flags are the CLI's (`cli_controller`).

`kubernetes` is imported only by `skinlesion.kube`, and only when a run starts.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from skinlesion import config, logs
from skinlesion.errors import ConfigError, InputError
from skinlesion.keys import safe_run_id
from skinlesion.kube_executor import KubernetesExecutor
from skinlesion.kube_jobs import (
    JOB_NAME_ENV,
    LABEL_INSTANCE,
    LABEL_RUN_ID,
    LABEL_STAGE,
    load_stages,
    run_id_from_job_name,
)
from skinlesion.layout import RunLayout
from skinlesion.lease import RunLease
from skinlesion.pipeline import plan, run_pipeline
from skinlesion.stages import STAGES

if TYPE_CHECKING:
    from skinlesion.kube import Kube

# The pipeline-level retry creates a fresh Job at once: pod restarts with back-off are
# the Job's own business (backoffLimit), and a finished-to-next handoff stays < 2 s.
RETRY_DELAY_S = 0.0


def _resolve_run_id(args: argparse.Namespace, release: str) -> str:
    if getattr(args, "run_id_from_job", False):
        name = os.environ.get(JOB_NAME_ENV)
        if not name:
            raise InputError(f"--run-id-from-job needs ${JOB_NAME_ENV} (the controller's Job name)")
        return run_id_from_job_name(name, release)
    return safe_run_id(args.run_id)


def run_controller(
    cfg: config.PipelineConfig, args: argparse.Namespace, kube: Kube | None = None
) -> int:
    """Run every stage not yet done as a Job, in order; 0, or raise naming the stage.

    `kube` is for tests (a client pointed at an emulator); otherwise the client is
    configured from --kubeconfig / --in-cluster.
    """
    log = logs.get()
    stages = load_stages(args.stages)
    release = args.release or stages.release
    if not release:
        raise ConfigError("release", "give --release or 'release' in the stages file")
    run_id = _resolve_run_id(args, release)
    logs.bind(run_id=run_id, stage="controller")
    store = args.store or stages.store
    if not store:
        raise ConfigError("store", "give --store or 'store' in the stages file")
    layout = RunLayout(store, run_id)
    missing = [c.stage.name for c in plan(cfg, layout, args.raw) if c.stage.name not in stages.jobs]
    if missing:
        raise ConfigError(
            "stages", f"{args.stages}: no Job shape for stage(s) {', '.join(missing)}"
        )

    if kube is None:
        from skinlesion import kube as kube_module

        kube = kube_module.Kube.connect(args.kubeconfig, args.in_cluster)
        namespace = args.namespace or stages.namespace or kube_module.default_namespace()
    else:
        namespace = args.namespace or stages.namespace
    if not namespace:
        raise ConfigError("namespace", "give --namespace or 'namespace' in the stages file")

    log.info(
        "controller_start",
        release=release,
        namespace=namespace,
        store=layout.store,
        stages=[s.name for s in STAGES if s.name in stages.jobs],
    )
    lease = RunLease(
        kube,
        namespace,
        f"{release}-{run_id}",
        args.lease_seconds,
        {LABEL_INSTANCE: release, LABEL_STAGE: "controller", LABEL_RUN_ID: run_id},
    )
    lease.acquire()
    executor = KubernetesExecutor(
        kube, stages, namespace, release, lease=lease, max_wait_s=args.max_wait_s
    )
    lease.start(on_lost=executor.interrupt)
    try:
        report = run_pipeline(cfg, layout, executor, raw_uri=args.raw, retry_delay_s=RETRY_DELAY_S)
    finally:
        lease.release()
    log.info(
        "controller_done",
        run=layout.run_uri,
        stages={s.stage: s.status for s in report.stages},
        attempts=sum(s.attempts for s in report.stages),
    )
    return 0
