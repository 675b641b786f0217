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
import time
from collections.abc import Sequence
from typing import Any

from skinlesion import config, faults, fields, logs, scratch
from skinlesion.cli_args import LOG_LEVELS, default_store, int_in, store_flag
from skinlesion.cli_controller import add_controller_arguments
from skinlesion.cli_models import add_models_tools, add_serve_tool
from skinlesion.cli_tools import add_store_tools
from skinlesion.errors import (
    EXIT_BAD_INPUT,
    EXIT_CTRL_C,
    EXIT_INTERRUPTED,
    InputError,
    SkinlesionError,
    Terminated,
)
from skinlesion.obs import pushgateway, stage_end
from skinlesion.stages import STAGES, job_inputs
from skinlesion.storage import Store, open_store
from skinlesion.userinput import one_line

STAGE_COMMANDS = frozenset(s.job for s in STAGES)


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


def _committed(
    args: argparse.Namespace,
    section: Any,
    out: Store,
    manifest: dict[str, Any],
    model: Store | None = None,
) -> None:
    """What the observability integrations take from a committed stage (each off unless
    configured): the Pushgateway exit push's figures, the MLflow stage report."""
    pushgateway.note_manifest(manifest)
    stage_end.report(
        manifest["stage"], args.run_id, args.command, config.to_dict(section), out, manifest, model
    )


def _sample_data(args: argparse.Namespace) -> int:
    from skinlesion.synthetic import write_sample_data

    summary = write_sample_data(store_flag("--out", args.out), images=args.images, seed=args.seed)
    print(json.dumps(summary, indent=2))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from skinlesion import prepare

    cfg = config.section_from_args(config.PrepareConfig, args, "prepare")
    if args.dry_run:
        print(json.dumps(prepare.plan_split(cfg, store_flag("--raw", args.raw)), indent=2))
        return 0
    if not args.out:
        raise InputError("--out is required unless --dry-run")
    raw, out = store_flag("--raw", args.raw), store_flag("--out", args.out)
    champion = store_flag("--champion", args.champion) if args.champion else None
    logs.import_tensorflow()
    manifest = prepare.run_prepare(cfg, raw, out, force=args.force, champion=champion)
    _committed(args, cfg, out, manifest)
    return 0


def _augment(args: argparse.Namespace) -> int:
    from skinlesion import augment

    cfg = config.section_from_args(config.AugmentConfig, args, "augment")
    prepared, out = store_flag("--prepared", args.prepared), store_flag("--out", args.out)
    logs.import_tensorflow()
    _committed(args, cfg, out, augment.run_augment(cfg, prepared, out, force=args.force))
    return 0


def _train(args: argparse.Namespace) -> int:
    cfg = config.section_from_args(config.TrainConfig, args, "train")
    if args.phase == "finetune" and not args.init_model:
        raise InputError("--phase finetune needs --init-model (the top phase's output)")
    init = store_flag("--init-model", args.init_model) if args.init_model else None
    train_data, val_data = (
        store_flag("--train-data", args.train_data),
        store_flag("--val-data", args.val_data),
    )
    out = store_flag("--out", args.out)
    logs.import_tensorflow()
    from skinlesion import train
    from skinlesion.train_cluster import Cluster

    # An Indexed Job's pod: its worker index and peers, from the variables the chart sets.
    cluster = Cluster.from_env(os.environ)
    if cluster is not None:
        os.environ["TF_CONFIG"] = cluster.tf_config()
    manifest = train.run_train(
        cfg, args.phase, train_data, val_data, out, init_model=init, force=args.force,
        cluster=cluster,
    )  # fmt: skip
    _committed(args, cfg, out, manifest)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from skinlesion import evaluate

    cfg = config.section_from_args(config.EvaluateConfig, args, "evaluate")
    model, val_data = store_flag("--model", args.model), store_flag("--val-data", args.val_data)
    out = store_flag("--out", args.out)
    logs.import_tensorflow()
    _committed(args, cfg, out, evaluate.run_evaluate(cfg, model, val_data, out, force=args.force))
    return 0


def _promote(args: argparse.Namespace) -> int:
    from skinlesion import promote

    cfg = config.section_from_args(config.PromoteConfig, args, "promote")
    candidate, model = store_flag("--candidate", args.candidate), store_flag("--model", args.model)
    out = (
        store_flag("--out", args.out)
        if args.out
        else open_store(promote.promote_uri(candidate.uri))
    )
    logs.import_tensorflow()  # its start-up lines filtered: the SavedModel export loads Keras
    manifest = promote.run_promote(
        cfg,
        candidate,
        model,
        store_flag("--target", args.target),
        run_id=args.run_id,
        force=args.force,
        out=out,
    )
    _committed(args, cfg, out, manifest, model)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from skinlesion.predict import predict

    logs.import_tensorflow()
    print(json.dumps(predict(args.model, args.images), indent=2))
    return 0


def _run(args: argparse.Namespace) -> int:
    from skinlesion.local_run import run_local

    cfg = config.load_pipeline(args.preset, args.config, args.set)
    store_flag("--store", args.store)
    if args.raw:
        store_flag("--raw", args.raw)
    return run_local(cfg, store_uri=args.store, raw_uri=args.raw, run_id=args.run_id)


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
    p.add_argument("--images", type=int_in(0, config.MAX_IMAGES), default=1500)
    p.add_argument("--seed", type=int_in(0, config.SEED_MAX), default=0)
    p.set_defaults(handler=_sample_data)

    p = _stage_parser(
        sub, "prepare", "validate, split, resize and shard HAM10000", config.PrepareConfig
    )
    p.add_argument("--out", help="store URI of the stage output")
    p.add_argument(
        "--champion", help="champion URI (…/models/latest): the data report compares with its data"
    )
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

    add_store_tools(sub)
    add_models_tools(sub)
    add_serve_tool(sub)

    for name, help_, handler in (
        ("run", "run every stage on this machine", _run),
        ("controller", "run every stage as Kubernetes Jobs", _controller),
    ):
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument(
            "--store",
            default=default_store(),
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
    stage = "finetune" if getattr(args, "phase", None) == "finetune" else args.command
    try:
        faults.arm(os.environ.get(faults.ENV), stage)  # tests only: no-op unless set
    except InputError as exc:
        print(f"skinlesion {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    signal.signal(signal.SIGTERM, _on_sigterm)
    if args.command not in STAGE_COMMANDS:
        return _handle(args)
    start, code = time.monotonic(), 1
    try:
        code = _handle(args)
        return code
    finally:  # every stage process pushes on exit, whatever the outcome (off unless set)
        pushgateway.push_stage(stage, args.run_id, code, time.monotonic() - start)


def _handle(args: argparse.Namespace) -> int:
    """Run the subcommand; errors become one line and an exit code (errors.py)."""
    log = logs.get()
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
