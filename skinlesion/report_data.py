"""The "Data against the champion" section of `report.html`, from prepare's
`data_report.json` (skinlesion/data_report.py). Every value is HTML-escaped."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from skinlesion.classes import CLASSES
from skinlesion.report import esc, fmt


def _brightness(stats: Mapping[str, Any] | None) -> str:
    if not stats:
        return "n/a"
    return f"{fmt(stats['mean'], 1)} ± {fmt(stats['std'], 1)}"


def _classes(report: Mapping[str, Any]) -> str:
    champion = report.get("champion") or {}
    then = champion.get("classes") or {}
    drift = report["drift"]["classes"]
    head = (
        "<tr><th>class</th><th>images</th><th>lesions</th><th>share</th><th>brightness</th>"
        "<th>champion images</th><th>champion lesions</th><th>champion share</th>"
        "<th>champion brightness</th><th>drift</th></tr>"
    )
    rows = []
    for name in CLASSES:
        now, old, flag = report["classes"][name], then.get(name, {}), drift.get(name)
        verdict = "not checked" if flag is None else ("; ".join(flag["reasons"]) or "no")
        style = ' class="mel"' if flag and flag["drift"] else ""
        rows.append(
            f"<tr{style}><td>{esc(name)}</td><td class=num>{fmt(now['images'])}</td>"
            f"<td class=num>{fmt(now['lesions'])}</td><td class=num>{fmt(now['share'])}</td>"
            f"<td class=num>{esc(_brightness(now['brightness']))}</td>"
            f"<td class=num>{fmt(old.get('images'))}</td>"
            f"<td class=num>{fmt(old.get('lesions'))}</td>"
            f"<td class=num>{fmt(old.get('share'))}</td>"
            f"<td class=num>{esc(_brightness(old.get('brightness')))}</td>"
            f"<td>{esc(verdict)}</td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def _changes(report: Mapping[str, Any]) -> str:
    changes = report.get("changes")
    if changes is None:
        return "<p class=note>New and removed images: not compared (no champion image index).</p>"
    parts = [
        f"<p>Against the champion's data: {fmt(changes['new'])} new, {fmt(changes['removed'])} "
        f"removed, {fmt(changes['changed'])} changed (same id, other bytes) images.</p>"
    ]
    for kind in ("new", "removed", "changed"):
        shown = changes["examples"][kind]
        if shown:
            more = " …" if changes[kind] > len(shown) else ""
            parts.append(
                f"<p class=note>{esc(kind)}: <code>{esc(', '.join(shown))}</code>{esc(more)}</p>"
            )
    return "".join(parts)


def _duplicates(report: Mapping[str, Any]) -> str:
    dup = report["duplicates"]
    text = (
        f"<p>Exact duplicates (same bytes): {fmt(dup['groups'])} groups of "
        f"{fmt(dup['images'])} images; {fmt(dup['across_lesions'])} groups span lesions, "
        f"{fmt(dup['across_split'])} of them both train and validation, "
        f"{fmt(dup['different_dx'])} with different diagnoses.</p>"
    )
    if dup["across_split"] or dup["different_dx"]:
        text += (
            "<p class=warn>The same image under different lesion ids defeats the lesion split "
            "(it is trained on and validated on) or contradicts its label: fix the metadata.</p>"
        )
    rows = "".join(
        f"<tr><td><code>{esc(g['sha256'][:12])}</code></td><td>{esc(', '.join(g['images']))}</td>"
        f"<td>{esc(', '.join(g['lesions']))}</td><td>{esc(', '.join(g['dx']))}</td>"
        f"<td>{esc(', '.join(g['sides']))}</td></tr>"
        for g in dup["examples"]
    )
    if rows:
        text += (
            "<table><tr><th>sha256</th><th>images</th><th>lesions</th><th>dx</th><th>sides</th>"
            f"</tr>{rows}</table>"
        )
    return text


def _sizes(report: Mapping[str, Any]) -> str:
    sizes, light = report["image_size"], report.get("brightness") or {}
    common = ", ".join(f"{s['size']} ({s['images']})" for s in sizes["common"])
    width, height = sizes.get("width") or {}, sizes.get("height") or {}
    return (
        "<table>"
        f"<tr><th>image sizes</th><td>{fmt(sizes['distinct'])} distinct; most common: "
        f"{esc(common or 'n/a')}</td></tr>"
        f"<tr><th>width (median, 5–95%)</th><td>{fmt(width.get('p50'), 0)} "
        f"({fmt(width.get('p05'), 0)}–{fmt(width.get('p95'), 0)})</td></tr>"
        f"<tr><th>height (median, 5–95%)</th><td>{fmt(height.get('p50'), 0)} "
        f"({fmt(height.get('p05'), 0)}–{fmt(height.get('p95'), 0)})</td></tr>"
        f"<tr><th>brightness (mean luma 0–255, 5–95%)</th><td>{fmt(light.get('mean'), 1)} "
        f"({fmt(light.get('p05'), 1)}–{fmt(light.get('p95'), 1)})</td></tr>"
        "</table>"
    )


def section(report: Mapping[str, Any] | None) -> str:
    """The section's HTML; a note when the data has no report (prepared before reports)."""
    if report is None:
        return "<p class=note>No data report: this data was prepared before data reports.</p>"
    champion, drift = report.get("champion"), report["drift"]
    if champion:
        against = (
            f"<p>Compared with the training data of the champion at prepare time: version "
            f"{fmt(champion['version'])} (run <code>{esc(champion['run_id'])}</code>, "
            f"{fmt(champion['images'])} images).</p>"
        )
    else:
        against = f"<p class=note>Not compared with a champion: {esc(drift['why_not'])}.</p>"
    seen = report.get("champion_trained_on_val")
    if seen and seen["images"]:
        against += (
            f"<p class=warn>{fmt(seen['images'])} of {fmt(seen['of_images'])} validation images "
            f"({fmt(seen['lesions'])} of {fmt(seen['of_lesions'])} lesions) belong to lesions the "
            "champion trained on: its figures on this validation data are inflated, so "
            "promote compares the two models without them. Keep the split and its seed "
            "across runs (lesion-hash keeps each lesion's side as data grows).</p>"
        )
    flagged = drift["flagged"]
    verdict = (
        f"<p class=warn>Drift flagged in {esc(', '.join(flagged))}.</p>"
        if flagged
        else ("<p>No class drifts.</p>" if drift["checked"] else "")
    )
    return "".join(
        [
            against,
            verdict,
            _classes(report),
            f"<p class=note>Drift rule: {esc(drift['rule'])}."
            + (f" {esc(drift['why_not'])}." if drift["checked"] and drift["why_not"] else "")
            + "</p>",
            _changes(report) if champion else "",
            _duplicates(report),
            _sizes(report),
        ]
    )
