"""`report.html`: one self-contained page per evaluation.

No external resource of any kind: inline CSS, every plot embedded as a base64
PNG data URI, no script. Every value that comes from data, manifests or
settings is HTML-escaped. The page says prominently when the data is synthetic.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skinlesion.classes import CLASSES, DISPLAY_NAMES, MELANOMA
from skinlesion.metrics import MEL_KEY

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_SKIPPED_LISTED = 20

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;
max-width:1100px;padding:1.5em;color:#1d2330;line-height:1.45}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #dde3ec;padding-bottom:.2em;margin-top:2em}
.sub{color:#5b6577;font-size:.92em;word-break:break-all}
.synthetic{background:#b3261e;color:#fff;padding:1em 1.2em;border-radius:6px;
font-size:1.15em;margin:1em 0}
.warn{background:#fff4d6;border-left:5px solid #e0a800;padding:.7em 1em;margin:1em 0}
.note{color:#5b6577;font-size:.9em}
table{border-collapse:collapse;margin:.6em 0 1em}
th,td{border:1px solid #dde3ec;padding:.3em .7em;text-align:left;vertical-align:top}
th{background:#f3f6fa}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.mel td{background:#fdecea;font-weight:600}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #dde3ec}
figcaption{color:#5b6577;font-size:.9em}
code{background:#f3f6fa;padding:0 .25em;border-radius:3px;word-break:break-all}
"""

_HEADLINE = (
    ("accuracy", "Accuracy", "share of images classified correctly (flattered by nv, ~67%)"),
    ("balanced_accuracy", "Balanced accuracy", "mean per-class recall; the ISIC 2018 ranking"),
    ("macro_f1", "Macro F1", "unweighted mean of per-class F1"),
    ("roc_auc_macro", "ROC AUC (macro, one-vs-rest)", "mean of per-class AUCs"),
    (
        "mel_sens",
        "Melanoma sensitivity at specificity 0.80",
        "best melanoma recall while at most 20% of other lesions are flagged",
    ),
    ("ece", "Expected calibration error", "top-label, equal-width bins; lower is better"),
    ("n_images", "Validation images", ""),
)


@dataclass
class ReportInputs:
    """Everything the page shows; all optional parts may be empty."""

    metrics: Mapping[str, Any]
    plots: Sequence[tuple[str, Path]] = ()  # (caption, PNG path), in page order
    training_plots: Sequence[tuple[str, Path]] = ()
    data_plots: Sequence[tuple[str, Path]] = ()
    data_manifest: Mapping[str, Any] | None = None  # the prepare manifest
    data_report: Mapping[str, Any] | None = None  # prepare's data_report.json
    augment_manifest: Mapping[str, Any] | None = None
    model_manifest: Mapping[str, Any] | None = None
    evaluate_settings: Mapping[str, Any] = field(default_factory=dict)
    sources: Mapping[str, str] = field(default_factory=dict)  # label -> URI
    created_at: str = ""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any, digits: int = 3) -> str:
    """A figure for a table cell, escaped; None reads n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return esc(value)
    if isinstance(value, float):
        return esc(f"{value:.{digits}f}")
    return esc(value)


def png_data_uri(path: Path) -> str:
    """A PNG file as a data URI; anything that is not a PNG is refused."""
    data = Path(path).read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError(f"{path} is not a PNG file")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figure(caption: str, path: Path) -> str:
    return (
        f'<figure><img alt="{esc(caption)}" src="{png_data_uri(path)}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def _kv_table(values: Mapping[str, Any]) -> str:
    rows = []
    for key, value in values.items():
        if isinstance(value, Mapping | list | tuple):
            shown = json.dumps(value, sort_keys=True, default=str)
        elif isinstance(value, float):
            shown = f"{value:.6g}"
        else:
            shown = value
        rows.append(f"<tr><th>{esc(key)}</th><td><code>{esc(shown)}</code></td></tr>")
    return "<table>" + "".join(rows) + "</table>" if rows else "<p class=note>none recorded</p>"


def _interval(bounds: Any) -> str:
    return f"{fmt(bounds[0])} – {fmt(bounds[1])}" if bounds else "–"


def _headline_table(metrics: Mapping[str, Any]) -> str:
    values = dict(metrics)
    values["mel_sens"] = metrics.get("melanoma", {}).get(MEL_KEY)
    ci = metrics.get("intervals") or {}
    rows = "".join(
        f"<tr><th>{esc(label)}</th><td class=num>{fmt(values.get(key))}</td>"
        f"<td class=num>{esc(_interval(ci.get(key)))}</td>"
        f"<td class=note>{esc(note)}</td></tr>"
        for key, label, note in _HEADLINE
    )
    head = "<tr><th>metric</th><th>value</th><th>95% interval</th><th>meaning</th></tr>"
    note = (
        f"<p class=note>Intervals: {ci['draws']} bootstrap resamples of the "
        f"{ci['n_lesions']} validation lesions (all images of a drawn lesion together).</p>"
        if ci
        else ""
    )
    return f"<table>{head}{rows}</table>{note}"


def _per_class_table(metrics: Mapping[str, Any]) -> str:
    per_class = metrics.get("per_class", {})
    head = (
        "<tr><th>class</th><th>diagnosis</th><th>precision</th><th>recall</th>"
        "<th>recall 95% interval</th><th>F1</th><th>support</th></tr>"
    )
    ci = (metrics.get("intervals") or {}).get("per_class", {})
    rows, few = [], []
    for name in CLASSES:
        row, bounds = per_class.get(name, {}), ci.get(name, {})
        cls = ' class="mel"' if name == MELANOMA else ""
        if bounds.get("few_images"):
            few.append(f"{name} ({bounds['images']} images, {bounds['lesions']} lesions)")
        rows.append(
            f"<tr{cls}><td>{esc(name)}</td><td>{esc(DISPLAY_NAMES[name])}</td>"
            + "".join(f"<td class=num>{fmt(row.get(k))}</td>" for k in ("precision", "recall"))
            + f"<td class=num>{esc(_interval(bounds.get('recall')))}</td>"
            + f"<td class=num>{fmt(row.get('f1'))}</td>"
            + f"<td class=num>{fmt(row.get('support'))}</td></tr>"
        )
    warn = (
        "<p class=warn>Few validation images in "
        + esc(", ".join(few))
        + ": their recall means little (a recall of 1.000 on 4 images is 4 of 4); read the "
        "interval, not the point.</p>"
        if few
        else ""
    )
    return f"<table>{head}{''.join(rows)}</table>{warn}"


def _confusion_table(metrics: Mapping[str, Any]) -> str:
    cm = metrics.get("confusion_matrix") or []
    if len(cm) != len(CLASSES):
        return ""
    head = "<tr><th>true \\ predicted</th>" + "".join(f"<th>{esc(c)}</th>" for c in CLASSES)
    rows = "".join(
        f"<tr><th>{esc(name)}</th>" + "".join(f"<td class=num>{fmt(v)}</td>" for v in row) + "</tr>"
        for name, row in zip(CLASSES, cm, strict=True)
    )
    return f"<table>{head}</tr>{rows}</table>"


def _counts_table(columns: Mapping[str, Any]) -> str:
    """{column: {class: n}} as one table with a row per class and a total row."""
    cols = [(name, c) for name, c in columns.items() if isinstance(c, Mapping)]
    if not cols:
        return ""
    head = "<tr><th>class</th>" + "".join(f"<th>{esc(n)}</th>" for n, _ in cols) + "</tr>"
    rows = []
    for name in CLASSES:
        rows.append(
            f"<tr><td>{esc(name)}</td>"
            + "".join(f"<td class=num>{fmt(c.get(name, 0))}</td>" for _, c in cols)
            + "</tr>"
        )
    totals = "".join(
        f"<th class=num>{fmt(sum(int(v) for v in c.values() if isinstance(v, int)))}</th>"
        for _, c in cols
    )
    rows.append(f"<tr><th>total</th>{totals}</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _skipped(value: Any) -> str:
    if value is None:
        return "<p>Skipped images: not recorded.</p>"
    if isinstance(value, int):
        return f"<p>Skipped (undecodable) images: {fmt(value)}.</p>"
    items = list(value) if isinstance(value, list | tuple) else [value]
    if not items:
        return "<p>Skipped (undecodable) images: none.</p>"
    shown = "".join(
        f"<li><code>{esc(json.dumps(i, default=str) if not isinstance(i, str) else i)}</code></li>"
        for i in items[:MAX_SKIPPED_LISTED]
    )
    more = len(items) - MAX_SKIPPED_LISTED
    tail = f"<li>… and {more} more</li>" if more > 0 else ""
    return f"<p>Skipped (undecodable) images: {len(items)}.</p><ul>{shown}{tail}</ul>"


def _data_section(data: Mapping[str, Any] | None, augment: Mapping[str, Any] | None) -> str:
    if data is None:
        return "<p class=warn>The prepare manifest was not available: data provenance unknown.</p>"
    settings = data.get("settings", {}) or {}
    split = data.get("split", settings.get("split"))
    parts = [
        "<table>",
        f"<tr><th>split mode</th><td>{esc(split)}</td></tr>",
        f"<tr><th>image size</th><td>{fmt(data.get('image_size'))}</td></tr>",
        f"<tr><th>resize</th><td>{esc(settings.get('resize', 'n/a'))}</td></tr>",
        f"<tr><th>synthetic data</th><td>{fmt(bool(data.get('synthetic')))}</td></tr>",
        f"<tr><th>lesions with images in both splits</th>"
        f"<td>{fmt(data.get('lesions_in_both'))}</td></tr>",
        "</table>",
    ]
    if isinstance(data.get("lesions_in_both"), int) and data["lesions_in_both"] > 0:
        parts.append(
            f"<p class=warn>{fmt(data['lesions_in_both'])} lesions have images in both train and "
            "validation (image-level split, as the reference): validation figures are inflated "
            "by near-duplicate images. Use the lesion-grouped split for honest figures.</p>"
        )
    counts = dict(data.get("counts", {}) or {})
    if augment is not None:
        aug_counts = augment.get("counts", {}) or {}
        if isinstance(aug_counts.get("after"), Mapping):
            counts["train after augment"] = aug_counts["after"]
    parts.append(_counts_table(counts))
    parts.append(_skipped(data.get("skipped")))
    return "".join(parts)


def _model_summary(model: Mapping[str, Any] | None) -> str:
    if model is None:
        return "<p class=note>model manifest not available</p>"
    keys = (
        "stage",
        "phase",
        "backbone",
        "image_size",
        "best_val_accuracy",
        "best_epoch",
        "epochs_run",
        "created_at",
        "fingerprint",
    )
    return _kv_table({k: model[k] for k in keys if k in model})


def render(inputs: ReportInputs) -> str:
    """The whole page as a string."""
    m = inputs.metrics
    data = inputs.data_manifest
    synthetic = bool(data and data.get("synthetic"))
    body = ["<h1>Skin-lesion classifier: evaluation report</h1>"]
    sub = " · ".join(f"{esc(k)}: <code>{esc(v)}</code>" for k, v in inputs.sources.items())
    if inputs.created_at:
        sub += f" · created {esc(inputs.created_at)}"
    body.append(f"<p class=sub>{sub}</p>")
    if synthetic:
        body.append(
            "<div class=synthetic><strong>SYNTHETIC DATA.</strong> This model was trained and "
            "evaluated on generated images in the HAM10000 layout. The figures below test the "
            "software only: <strong>figures are not medical results</strong>.</div>"
        )
    body.append("<h2>Headline metrics</h2>")
    body.append(_headline_table(m))
    body.append(
        "<p class=note>Validation split only. Public reference points (real data): ISIC 2018 "
        "Task 3 winner balanced accuracy 0.885; leak-free DermaMNIST ResNet-50 at 224 px "
        "accuracy about 0.846, AUC about 0.948.</p>"
    )
    body.append("<h2>Per class</h2>")
    body.append(_per_class_table(m))
    body.append("<h2>Confusion matrix and ROC</h2>")
    body.append(_confusion_table(m))
    body.extend(_figure(c, p) for c, p in inputs.plots)
    if inputs.training_plots:
        body.append("<h2>Training</h2>")
        body.extend(_figure(c, p) for c, p in inputs.training_plots)
    body.append("<h2>Dataset and split</h2>")
    body.append(_data_section(data, inputs.augment_manifest))
    body.extend(_figure(c, p) for c, p in inputs.data_plots)
    body.append("<h2>Data against the champion</h2>")
    from skinlesion.report_data import section  # it formats with this module's helpers

    body.append(section(inputs.data_report))
    body.append("<h2>Model and settings</h2>")
    body.append("<h3>Model</h3>")
    body.append(_model_summary(inputs.model_manifest))
    body.append("<h3>Training settings</h3>")
    body.append(_kv_table((inputs.model_manifest or {}).get("settings", {}) or {}))
    if data is not None:
        body.append("<h3>Prepare settings</h3>")
        body.append(_kv_table(data.get("settings", {}) or {}))
    body.append("<h3>Evaluate settings</h3>")
    body.append(_kv_table(inputs.evaluate_settings))
    title = "Evaluation report" + (" (SYNTHETIC DATA)" if synthetic else "")
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )


def write(path: Path, inputs: ReportInputs) -> Path:
    path.write_text(render(inputs), encoding="utf-8")
    return path
