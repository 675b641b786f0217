"""The store tools of the CLI: `runs list|show`, `gc` and `cancel`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from skinlesion import logs
from skinlesion.cli_args import LOG_LEVELS, default_store, int_in, store_flag
from skinlesion.errors import InputError
from skinlesion.storage import open_store


def _cancel(args: argparse.Namespace) -> int:
    from skinlesion import cancel
    from skinlesion.layout import RunLayout

    store_flag("--store", args.store)
    layout = RunLayout(args.store, args.run_id)
    if not open_store(layout.run_uri).list():
        raise InputError(f"--run-id: no run '{layout.run_id}' in {layout.store}")
    record = cancel.mark(layout, args.reason)
    deleted: list[str] = []
    if args.namespace:
        from skinlesion.kube import Kube

        kube = Kube.connect(args.kubeconfig, args.in_cluster)
        deleted = cancel.delete_jobs(kube, args.namespace, args.release, layout.run_id)
    logs.get().info("run_cancelled", run=layout.run_uri, jobs_deleted=deleted, **record)
    print(f"run {layout.run_id}: cancelled ({len(deleted)} Jobs deleted); rerun it to resume")
    return 0


def _runs(args: argparse.Namespace) -> int:
    from skinlesion import run_status

    store_flag("--store", args.store)
    if args.action == "show":
        if args.run_id not in run_status.run_ids(args.store):
            raise InputError(f"RUN_ID: no run '{args.run_id}' in {args.store}")
        status = run_status.run_status(args.store, args.run_id)
        print(
            json.dumps(status.to_json(), indent=2) if args.json else run_status.format_show(status)
        )
        return 0
    statuses = [run_status.run_status(args.store, r) for r in run_status.run_ids(args.store)]
    if args.json:
        print(json.dumps([s.to_json() for s in statuses], indent=2))
    else:
        print(run_status.format_list(statuses))
    return 0


def _gc(args: argparse.Namespace) -> int:
    from skinlesion import retention

    store_flag("--store", args.store)
    rows = retention.collect(args.store, args.keep_last, args.older_than, args.dry_run)
    for r in rows:
        print(f"{r['action']:<13}{r['run_id']:<24}{r['objects']:>7} objects  ({r['why']})")
    deleted = [r for r in rows if r["action"] != "keep"]
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} {len(deleted)} of {len(rows)} runs")
    return 0


def add_store_tools(sub: Any) -> None:
    """Add `runs`, `gc` and `cancel` to the CLI's subcommands."""
    p = sub.add_parser("runs", help="the runs in a store and their stages' states")
    actions = p.add_subparsers(dest="action", required=True)
    for action, help_ in (("list", "every run, one line each"), ("show", "one run, per stage")):
        q = actions.add_parser(action, help=help_, description=help_)
        q.add_argument("--store", default=default_store(), help="store URI")
        q.add_argument("--json", action="store_true", help="print JSON")
        q.add_argument("--log-level", default="WARNING", choices=LOG_LEVELS)
        q.set_defaults(handler=_runs, run_id="-")
        if action == "show":
            q.add_argument("run_id", metavar="RUN_ID")
    p.set_defaults(handler=_runs, run_id="-", log_level="WARNING")

    p = sub.add_parser(
        "gc",
        help="delete old runs' outputs (never the champion's lineage)",
        description="Delete the outputs of old runs: all but the newest --keep-last, and only "
        "those older than --older-than days when given. The run the champion was built "
        "from and running runs are kept. A rerun of a deleted run id recomputes it.",
    )
    p.add_argument("--store", default=default_store(), help="store URI")
    p.add_argument("--keep-last", type=int_in(0, 1_000_000), required=True, metavar="N")
    p.add_argument("--older-than", type=float, metavar="DAYS", help="only runs older than this")
    p.add_argument("--dry-run", action="store_true", help="print what would go; delete nothing")
    p.add_argument("--log-level", default="INFO", choices=LOG_LEVELS)
    p.set_defaults(handler=_gc, run_id="-")

    p = sub.add_parser(
        "cancel",
        help="cancel a run: mark it in the store, delete its Kubernetes Jobs",
        description="Mark the run cancelled (the run loop stops at its next step) and, with "
        "--namespace, delete its Jobs and their pods. Rerunning the same run id resumes it.",
    )
    p.add_argument("--store", default=default_store(), help="store URI")
    p.add_argument("--run-id", required=True, help="the run to cancel")
    p.add_argument("--reason", default="cancelled by a user", help="recorded with the mark")
    p.add_argument("--namespace", help="also delete the run's Jobs in this namespace")
    p.add_argument("--release", default="skinlesion", help="Helm release of the Jobs")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG)")
    where.add_argument("--in-cluster", action="store_true", default=None)
    p.add_argument("--log-level", default="INFO", choices=LOG_LEVELS)
    p.set_defaults(handler=_cancel)
