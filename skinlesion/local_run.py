"""`skinlesion run`: the whole pipeline on this machine with the local executor."""

from __future__ import annotations

import sys

from skinlesion import config, logs
from skinlesion.classes import CLASSES
from skinlesion.layout import METRICS_FILE, REPORT_FILE, RunLayout, models_uri
from skinlesion.manifest import read_manifest, read_result
from skinlesion.pipeline import LocalExecutor, RunReport, run_pipeline
from skinlesion.results import PromoteResult
from skinlesion.storage import get_json, open_store


def ensure_raw_data(layout: RunLayout, raw_uri: str | None, images: int) -> str:
    """The raw tree to use: the given one, or synthetic data written once under the store."""
    if raw_uri:
        return raw_uri
    raw = open_store(layout.default_raw)
    if not raw.exists("HAM10000_metadata.csv"):
        from skinlesion.synthetic import write_sample_data

        logs.get().warning(
            "synthetic_data",
            message="no raw data given: writing a SYNTHETIC HAM10000-format set "
            "(figures from it are not medical results)",
            images=images,
            out=raw.uri,
        )
        write_sample_data(raw, images=images, seed=0)
    return layout.default_raw


def format_metrics(metrics: dict) -> str:
    """A plain-text table of the headline and per-class figures."""
    lines = [
        f"{'accuracy':<28}{metrics['accuracy']:.3f}",
        f"{'balanced accuracy':<28}{metrics['balanced_accuracy']:.3f}",
        f"{'macro F1':<28}{metrics['macro_f1']:.3f}",
        f"{'ROC AUC (macro, OvR)':<28}{metrics['roc_auc_macro']:.3f}",
        f"{'melanoma sens. @ spec 0.80':<28}"
        f"{metrics['melanoma']['sensitivity_at_specificity_0.80']:.3f}",
        f"{'ECE':<28}{metrics['ece']:.3f}",
        f"{'images':<28}{metrics['n_images']}",
        "",
        f"{'class':<8}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}",
    ]
    for name in CLASSES:
        row = metrics["per_class"][name]
        lines.append(
            f"{name:<8}{row['precision']:>10.3f}{row['recall']:>10.3f}{row['f1']:>10.3f}"
            f"{row['support']:>10}"
        )
    return "\n".join(lines)


def print_summary(layout: RunLayout, report: RunReport) -> None:
    evaluate = open_store(layout.stage_uri("evaluate"))
    metrics = get_json(evaluate, METRICS_FILE)
    promote = open_store(layout.stage_uri("promote"))
    out = sys.stdout
    print(
        f"\nrun {layout.run_id}: " + ", ".join(f"{s.stage} {s.status}" for s in report.stages),
        file=out,
    )
    print(format_metrics(metrics), file=out)
    if read_manifest(promote) is not None:
        decision = read_result(promote, PromoteResult, "promote")[1].decision
        print(f"\npromotion: {decision['promoted']} ({decision['reason']})", file=out)
        if decision.get("version") is not None:
            print(_version_line(layout, decision["version"]), file=out)
    print(f"\nreport: {evaluate.uri}/{REPORT_FILE}", file=out)


def _version_line(layout: RunLayout, n: int) -> str:
    """Which version the run registered, its aliases and where its SavedModel is."""
    from skinlesion import registry

    models = open_store(models_uri(layout.store))
    _, reg = registry.read_raw(models)
    aliases = ", ".join(registry.aliases_of(reg, n)) or "no alias"
    served = registry.entry(reg, n).get("serving")
    where = f"SavedModel {models.uri}/{served}" if served else "no SavedModel exported"
    return f"model version {n} ({aliases}): {where}"


def run_local(cfg: config.PipelineConfig, store_uri: str, raw_uri: str | None, run_id: str) -> int:
    layout = RunLayout(store_uri, run_id)
    logs.bind(run_id=run_id)
    raw = ensure_raw_data(layout, raw_uri, cfg.synthetic_images)
    report = run_pipeline(cfg, layout, LocalExecutor(), raw_uri=raw)
    print_summary(layout, report)
    return 0
