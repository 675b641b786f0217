"""The registry's CLI: `models list|show N|rollback [--to N]|export N --out DIR`, and
`serve --model URI` (an HTTP endpoint for a version's SavedModel)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from skinlesion import logs
from skinlesion.cli_args import LOG_LEVELS, default_store, int_in, store_flag
from skinlesion.errors import Terminated
from skinlesion.layout import models_uri
from skinlesion.obs import mlflow_log


def _rows(registry: dict[str, Any]) -> list[dict[str, Any]]:
    from skinlesion.registry import aliases_of

    return [{**e, "aliases": aliases_of(registry, e["version"])} for e in registry["versions"]]


def _line(e: dict[str, Any]) -> str:
    value = e["metric_value"]
    score = f"{value:.4f}" if isinstance(value, float) else "-"
    aliases = ",".join(e["aliases"]) or "-"
    return (
        f"{e['version']:>4}  {aliases:<17} {e['run_id']:<20} {e['backbone']:<16} "
        f"{e['metric']}={score}  {e['created_at']}"
    )


def _models(args: argparse.Namespace) -> int:
    from skinlesion import registry

    store_flag("--store", args.store)
    models = store_flag("--store", models_uri(args.store))
    if args.action == "rollback":
        event = registry.rollback(models, args.to)
        mlflow_log.move_champion(event["champion"])  # MLflow's alias follows (when set)
        print(f"champion: version {event['champion']} (was {event['from']})")
        return 0
    _, reg = registry.read_raw(models)
    if args.action == "export":
        paths = registry.export(models, args.n, Path(args.out))
        print(f"version {args.n}: {len(paths)} files -> {args.out}")
        return 0
    rows = _rows(reg)
    if args.action == "show":
        registry.entry(reg, args.n)  # a one-line error for an unknown version
        row = next(r for r in rows if r["version"] == args.n)
        history = [h for h in reg["history"] if args.n in (h["champion"], h["from"])]
        shown = {**row, "history": history}
        print(json.dumps(shown, indent=2) if args.json else _show(shown))
        return 0
    if args.json:
        print(json.dumps({"versions": rows, "aliases": reg["aliases"]}, indent=2))
    else:
        print("\n".join(_line(r) for r in rows) if rows else "no model versions")
    return 0


def _show(row: dict[str, Any]) -> str:
    lines = [_line(row), f"  data      {row['data_fingerprint'][:12]}"]
    lines += [f"  {stage:<9} {fp[:12]}" for stage, fp in sorted(row["stages"].items())]
    lines += [f"  image     {row['image_tag'] or '-'}  size {row['image_size']}"]
    lines += [f"  serving   {row.get('serving') or '-'}"]
    lines += [
        f"  {h['at']} {h['action']} -> {h['champion']} (from {h['from']})" for h in row["history"]
    ]
    return "\n".join(lines)


def add_models_tools(sub: Any) -> None:
    """Add `models list|show|rollback|export` to the CLI's subcommands."""
    p = sub.add_parser("models", help="the model registry: versions, aliases, rollback")
    actions = p.add_subparsers(dest="action", required=True)
    version = int_in(1, 10**9)
    for action, help_ in (
        ("list", "every version, one line each"),
        ("show", "one version: lineage, metrics, history"),
        ("rollback", "move the champion alias to the previous champion (or --to N)"),
        ("export", "copy version N's files to a local directory"),
    ):
        q = actions.add_parser(action, help=help_, description=help_)
        q.add_argument("--store", default=default_store(), help="store URI")
        q.add_argument("--log-level", default="WARNING", choices=LOG_LEVELS)
        q.set_defaults(handler=_models, run_id="-")
        if action in ("list", "show"):
            q.add_argument("--json", action="store_true", help="print JSON")
        if action in ("show", "export"):
            q.add_argument("n", metavar="N", type=version)
        if action == "rollback":
            q.add_argument("--to", type=version, metavar="N", help="this version")
        if action == "export":
            q.add_argument("--out", required=True, metavar="DIR", help="local directory")
    p.set_defaults(handler=_models, run_id="-", log_level="WARNING")


def _serve(args: argparse.Namespace) -> int:
    from skinlesion.serve import Server, open_model

    if "://" in args.model:
        store_flag("--model", args.model)  # a bad URI: one line naming the flag
    logs.import_tensorflow()
    server = Server(open_model(args.model, args.version, args.name), args.host, args.port)
    host, port = server.address
    print(
        f"serving {server.model.source} at http://{host}:{port}/v1/models/{args.name}", flush=True
    )
    try:
        server.serve_forever()
    except (KeyboardInterrupt, Terminated):  # a server's normal end: exit 0
        logs.get().info("serve_stopped")
    finally:
        server.httpd.server_close()
    return 0


def _name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", text):
        raise argparse.ArgumentTypeError(f"letters, digits, '_', '.', '-' only, got {text!r}")
    return text


def add_serve_tool(sub: Any) -> None:
    """Add `serve` to the CLI's subcommands."""
    help_ = "serve a SavedModel over HTTP (KServe v1 / TF Serving REST predict)"
    p = sub.add_parser("serve", help=help_, description=help_)
    p.add_argument(
        "--model",
        required=True,
        metavar="URI",
        help="a SavedModel directory or prefix (…/models/serving/N), or a store: its champion "
        "(or --version N)",
    )
    p.add_argument("--version", type=int_in(1, 10**9), metavar="N", help="version (with a store)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int_in(0, 65535), default=8501, help="port (0: any free one)")
    p.add_argument("--name", type=_name, default="skinlesion", help="model name in the URL path")
    p.add_argument("--log-level", default="INFO", choices=LOG_LEVELS)
    p.set_defaults(handler=_serve, run_id="-")
