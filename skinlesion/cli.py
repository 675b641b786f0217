"""The `skinlesion` command: one subcommand per stage plus run, controller and tools.

Handlers only parse arguments, open stores and call the library; `jobs/*.py`
call `main()` with their subcommand, so the CLI and the Jobs share one path.
Errors become one line on stderr and an exit code (errors.py): bad input of any
kind (a flag's value, a `--config` file, a store URI) is `skinlesion <cmd>: error:
...` and exit 2; Ctrl-C exits 130 and SIGTERM 143, saying how to resume.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from skinlesion import config, fields, logs, scratch
from skinlesion.cli_controller import add_controller_arguments
from skinlesion.errors import (
    EXIT_BAD_INPUT,
    EXIT_CTRL_C,
    EXIT_INTERRUPTED,
    InputError,
    SkinlesionError,
    Terminated,
)
from skinlesion.stages import job_inputs
from skinlesion.storage import Store, open_store
from skinlesion.userinput import one_line

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _store(flag: str, uri: str) -> Store:
    """The store a flag names; a bad URI or path is an error naming the flag."""
    try:
        return open_store(uri)
    except InputError as exc:
        raise InputError(f"{flag}: {exc}") from None


def _int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (argparse names the flag)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {value}")
        return value

    return parse


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-id", default="-", help="run id for log lines (and the run's prefix)")
    p.add_argument("--log-level", default="INFO", choices=LOG_LEVELS)


def _stage_parser(
    sub: Any, name: str, help_: str, section: type | None = None
) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(name, help=help_, description=help_)
    _common(p)
    for spec, required in job_inputs(name):  # a stage command's inputs: the stage table
        p.add_argument(spec.flag, required=required, help=spec.help)
    if section is not None:
        p.add_argument("--config", help="YAML file: a pipeline config or this stage's section")
        p.add_argument("--force", action="store_true", help="redo even if already committed")
        fields.add_flags(p, section)
    return p


# --- handlers -----------------------------------------------------------------------------


def _sample_data(args: argparse.Namespace) -> int:
    from skinlesion.synthetic import write_sample_data

    summary = write_sample_data(_store("--out", args.out), images=args.images, seed=args.seed)
    print(json.dumps(summary, indent=2))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from skinlesion import prepare

    cfg = config.section_from_args(config.PrepareConfig, args, "prepare")
    if args.dry_run:
        print(json.dumps(prepare.plan_split(cfg, _store("--raw", args.raw)), indent=2))
        return 0
    if not args.out:
        raise InputError("--out is required unless --dry-run")
    raw, out = _store("--raw", args.raw), _store("--out", args.out)
    logs.import_tensorflow()
    prepare.run_prepare(cfg, raw, out, force=args.force)
    return 0


def _augment(args: argparse.Namespace) -> int:
    from skinlesion import augment

    cfg = config.section_from_args(config.AugmentConfig, args, "augment")
    prepared, out = _store("--prepared", args.prepared), _store("--out", args.out)
    logs.import_tensorflow()
    augment.run_augment(cfg, prepared, out, force=args.force)
    return 0


def _train(args: argparse.Namespace) -> int:
    cfg = config.section_from_args(config.TrainConfig, args, "train")
    if args.phase == "finetune" and not args.init_model:
        raise InputError("--phase finetune needs --init-model (the top phase's output)")
    init = _store("--init-model", args.init_model) if args.init_model else None
    train_data, val_data = (
        _store("--train-data", args.train_data),
        _store("--val-data", args.val_data),
    )
    out = _store("--out", args.out)
    logs.import_tensorflow()
    from skinlesion import train

    train.run_train(cfg, args.phase, train_data, val_data, out, init_model=init, force=args.force)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from skinlesion import evaluate

    cfg = config.section_from_args(config.EvaluateConfig, args, "evaluate")
    model, val_data = _store("--model", args.model), _store("--val-data", args.val_data)
    out = _store("--out", args.out)
    logs.import_tensorflow()
    evaluate.run_evaluate(cfg, model, val_data, out, force=args.force)
    return 0


def _promote(args: argparse.Namespace) -> int:
    from skinlesion import promote

    cfg = config.section_from_args(config.PromoteConfig, args, "promote")
    promote.run_promote(
        cfg,
        _store("--candidate", args.candidate),
        _store("--model", args.model),
        _store("--target", args.target),
        run_id=args.run_id,
        force=args.force,
        out=_store("--out", args.out) if args.out else None,
    )
    return 0


def _predict(args: argparse.Namespace) -> int:
    from skinlesion.predict import predict

    logs.import_tensorflow()
    print(json.dumps(predict(args.model, args.images), indent=2))
    return 0


def _run(args: argparse.Namespace) -> int:
    from skinlesion.local_run import run_local

    cfg = config.load_pipeline(args.preset, args.config, args.set)
    _store("--store", args.store)
    if args.raw:
        _store("--raw", args.raw)
    return run_local(cfg, store_uri=args.store, raw_uri=args.raw, run_id=args.run_id)


def _cancel(args: argparse.Namespace) -> int:
    from skinlesion import cancel
    from skinlesion.layout import RunLayout

    _store("--store", args.store)
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

    _store("--store", args.store)
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

    _store("--store", args.store)
    rows = retention.collect(args.store, args.keep_last, args.older_than, args.dry_run)
    for r in rows:
        print(f"{r['action']:<13}{r['run_id']:<24}{r['objects']:>7} objects  ({r['why']})")
    deleted = [r for r in rows if r["action"] != "keep"]
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} {len(deleted)} of {len(rows)} runs")
    return 0


def _controller(args: argparse.Namespace) -> int:
    from skinlesion.controller import run_controller

    cfg = config.load_pipeline(args.preset, args.config, args.set)
    return run_controller(cfg, args)


# --- parser -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skinlesion", description="HAM10000 skin-lesion classifier retraining pipeline"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = _stage_parser(sub, "sample-data", "write a synthetic HAM10000-format tree")
    p.add_argument("--out", required=True, help="store URI of the tree (…/raw/HAM10000)")
    p.add_argument("--images", type=_int_in(0, config.MAX_IMAGES), default=1500)
    p.add_argument("--seed", type=_int_in(0, config.SEED_MAX), default=0)
    p.set_defaults(handler=_sample_data)

    p = _stage_parser(
        sub, "prepare", "validate, split, resize and shard HAM10000", config.PrepareConfig
    )
    p.add_argument("--out", help="store URI of the stage output")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the metadata and print the split plan as JSON; read no images",
    )
    p.set_defaults(handler=_prepare)

    p = _stage_parser(
        sub, "augment", "balance the training set with augmented variants", config.AugmentConfig
    )
    p.add_argument("--out", required=True)
    p.set_defaults(handler=_augment)

    p = _stage_parser(
        sub, "train", "train the head (top) or fine-tune the last block", config.TrainConfig
    )
    p.add_argument("--phase", choices=["top", "finetune"], default="top")
    p.add_argument("--out", required=True)
    p.set_defaults(handler=_train)

    p = _stage_parser(
        sub, "evaluate", "metrics, plots and HTML report on the val split", config.EvaluateConfig
    )
    p.add_argument("--out", required=True)
    p.set_defaults(handler=_evaluate)

    p = _stage_parser(
        sub, "promote", "replace models/latest if the candidate beats it", config.PromoteConfig
    )
    p.add_argument("--target", required=True, help="champion URI (…/models/latest)")
    p.add_argument("--out", help="this stage's prefix (default: sibling 'promote' of --candidate)")
    p.set_defaults(handler=_promote)

    p = _stage_parser(sub, "predict", "class probabilities for images, as JSON")
    p.add_argument("--model", required=True, help="model URI: a stage output or .keras file")
    p.add_argument("images", nargs="+", help="image files (JPEG/PNG)")
    p.set_defaults(handler=_predict)

    p = sub.add_parser("runs", help="the runs in a store and their stages' states")
    actions = p.add_subparsers(dest="action", required=True)
    for action, help_ in (("list", "every run, one line each"), ("show", "one run, per stage")):
        q = actions.add_parser(action, help=help_, description=help_)
        q.add_argument("--store", default=(Path.cwd() / "store").as_uri(), help="store URI")
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
    p.add_argument("--store", default=(Path.cwd() / "store").as_uri(), help="store URI")
    p.add_argument("--keep-last", type=_int_in(0, 1_000_000), required=True, metavar="N")
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
    p.add_argument("--store", default=(Path.cwd() / "store").as_uri(), help="store URI")
    p.add_argument("--run-id", required=True, help="the run to cancel")
    p.add_argument("--reason", default="cancelled by a user", help="recorded with the mark")
    p.add_argument("--namespace", help="also delete the run's Jobs in this namespace")
    p.add_argument("--release", default="skinlesion", help="Helm release of the Jobs")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG)")
    where.add_argument("--in-cluster", action="store_true", default=None)
    p.add_argument("--log-level", default="INFO", choices=LOG_LEVELS)
    p.set_defaults(handler=_cancel)

    for name, help_, handler in (
        ("run", "run every stage on this machine", _run),
        ("controller", "run every stage as Kubernetes Jobs", _controller),
    ):
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument(
            "--store",
            default=(Path.cwd() / "store").as_uri(),
            help="store URI (default: ./store)",
        )
        p.add_argument("--raw", help="HAM10000 tree URI (default: <store>/raw/HAM10000)")
        p.add_argument("--run-id", default="local", help="run id (rerun the same id to resume)")
        p.add_argument(
            "--preset",
            default="cpu" if name == "run" else "default",
            choices=sorted(config.PRESETS),
        )
        p.add_argument("--config", help="pipeline YAML (sections prepare, augment, train, …)")
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="SECTION.FIELD=VALUE",
            help="override one config field (repeatable)",
        )
        p.add_argument("--log-level", default="INFO", choices=LOG_LEVELS)
        p.set_defaults(handler=handler)
        if name == "controller":
            add_controller_arguments(p)
    for command_parser in sub.choices.values():  # errors then say `skinlesion <cmd>: error:`
        command_parser.set_defaults(command_parser=command_parser)
    return parser


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The arguments; every usage error (also an unknown flag) is reported by the
    subcommand's parser, so it reads `skinlesion <cmd>: error: ...`, exit 2."""
    args, extra = build_parser().parse_known_args(argv)
    if extra:
        args.command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _on_sigterm(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the clean-up runs undisturbed
    raise Terminated()


def _resume_hint(command: str) -> str:
    same = (
        "the same command (same --run-id)"
        if command in ("run", "controller")
        else ("the same command")
    )
    return f"finished stages and the last epoch are saved; rerun {same} to resume"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parse(argv)
    except SystemExit as exc:  # argparse printed usage and `skinlesion <cmd>: error: ...`
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    logs.configure(run_id=args.run_id, stage=args.command, level=args.log_level)
    scratch.configure(os.environ.get(scratch.ENV))  # the environment is read here, once
    log = logs.get()
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return int(args.handler(args))
    except SkinlesionError as exc:
        log.error("failed", error=str(exc), exit_code=exc.exit_code)
        print(f"skinlesion {args.command}: error: {one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except (KeyboardInterrupt, Terminated) as exc:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a parent's SIGTERM after Ctrl-C
        how, code = (
            ("SIGTERM", EXIT_INTERRUPTED)
            if isinstance(exc, Terminated)
            else (
                "Ctrl-C",
                EXIT_CTRL_C,
            )
        )
        log.warning("interrupted", signal=how, exit_code=code)
        print(
            f"skinlesion {args.command}: interrupted ({how}): {_resume_hint(args.command)}",
            file=sys.stderr,
        )
        return code
    except (OSError, ValueError) as exc:
        # Unexpected: keep the traceback in the log for the developer, exit non-bad-input.
        log.exception("crashed", error=f"{type(exc).__name__}: {exc}")
        return 1 if not isinstance(exc, FileNotFoundError) else EXIT_BAD_INPUT


if __name__ == "__main__":
    raise SystemExit(main())
