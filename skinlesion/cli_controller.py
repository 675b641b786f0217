"""The flags of `skinlesion controller` beyond the shared run flags (skinlesion.cli)."""

from __future__ import annotations

import argparse

from skinlesion.kube_jobs import JOB_NAME_ENV


def add_controller_arguments(parser: argparse.ArgumentParser) -> None:
    """Add them to the `controller` subcommand's parser."""
    # The stages file names the store; an explicit --store still wins.
    parser.set_defaults(store=None)
    parser.add_argument(
        "--stages",
        required=True,
        metavar="PATH",
        help="YAML from the Helm chart: {release, namespace, store, stages: {<stage>: {job: …}}}",
    )
    parser.add_argument(
        "--namespace", help="namespace of the stage Jobs (default: the stages file's)"
    )
    parser.add_argument(
        "--release", help="Helm release: Job name prefix and label (default: the stages file's)"
    )
    parser.add_argument(
        "--run-id-from-job",
        action="store_true",
        help=f"derive the run id from ${JOB_NAME_ENV} (the controller's own Job name, "
        "unique per CronJob run); overrides --run-id",
    )
    parser.add_argument(
        "--lease-seconds",
        type=float,
        default=30.0,
        help="Lease duration; renewed every third of it (default 30)",
    )
    parser.add_argument(
        "--max-wait-s",
        type=float,
        default=0.0,
        help="give up on a stage Job after this long (delete it; counts as a failed attempt); "
        "0 = no limit besides the Job's own activeDeadlineSeconds (default)",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)"
    )
    where.add_argument(
        "--in-cluster",
        action="store_true",
        default=None,
        help="use the pod's service account (default when $KUBERNETES_SERVICE_HOST is set)",
    )
