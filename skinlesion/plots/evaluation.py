"""Evaluation plots: confusion matrix, one-vs-rest ROC curves, reliability diagram."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import pyplot as plt

from skinlesion.classes import CLASSES, MELANOMA
from skinlesion.plots import save


def confusion_matrix_png(cm: Any, path: Path) -> Path:
    """Counts and row-normalised (recall) matrices side by side, rows = true class."""
    counts = np.asarray(cm, dtype=np.int64)
    rows = counts.sum(axis=1, keepdims=True)
    norm = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.6))
    panels = (
        (axes[0], counts, "Counts", lambda v: f"{int(v)}", counts.max() or 1),
        (axes[1], norm, "Row-normalised (recall on the diagonal)", lambda v: f"{v:.2f}", 1.0),
    )
    for ax, data, title, fmt, vmax in panels:
        im = ax.imshow(data, cmap="Blues", vmin=0, vmax=vmax)
        ax.set_title(title)
        ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=45, ha="right")
        ax.set_yticks(range(len(CLASSES)), CLASSES)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        for i in range(len(CLASSES)):
            for j in range(len(CLASSES)):
                value = data[i, j]
                dark = value > 0.55 * vmax
                ax.text(
                    j,
                    i,
                    fmt(value),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if dark else "black",
                )
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"Confusion matrix ({int(counts.sum())} validation images)")
    fig.tight_layout()
    return save(fig, path)


def _roc_points(positive: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(positive, score)
    return fpr, tpr


def roc_png(y_true: Any, proba: Any, auc_macro: float | None, path: Path) -> Path:
    """One-vs-rest ROC curve per class present, melanoma highlighted, macro AUC in the title."""
    from skinlesion.metrics import MEL_SPECIFICITY, binary_auc

    y = np.asarray(y_true)
    p = np.asarray(proba, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(7, 6.5))
    colours = plt.get_cmap("tab10")
    for k, name in enumerate(CLASSES):
        positive = y == k
        auc = binary_auc(positive, p[:, k])
        if auc is None:  # class absent (or alone): no curve
            continue
        fpr, tpr = _roc_points(positive, p[:, k])
        mel = name == MELANOMA
        ax.plot(
            fpr,
            tpr,
            color="crimson" if mel else colours(k),
            lw=3.0 if mel else 1.2,
            alpha=1.0 if mel else 0.8,
            zorder=3 if mel else 2,
            label=f"{name}{' (melanoma)' if mel else ''}  AUC {auc:.3f}",
        )
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8, label="chance")
    ax.axvline(
        1 - MEL_SPECIFICITY,
        ls=":",
        color="crimson",
        lw=0.8,
        label=f"specificity {MEL_SPECIFICITY:.2f}",
    )
    macro = "n/a" if auc_macro is None else f"{auc_macro:.3f}"
    ax.set_title(f"One-vs-rest ROC, macro AUC {macro}")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return save(fig, path)


def reliability_png(y_true: Any, proba: Any, bins: int, ece: float, path: Path) -> Path:
    """Top-label reliability diagram: accuracy vs confidence per equal-width bin."""
    from skinlesion.metrics import calibration_bins

    counts, acc, mean_conf = calibration_bins(np.asarray(y_true), np.asarray(proba), bins)
    edges = np.arange(bins + 1) / bins
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(6.5, 7), height_ratios=[3, 1], sharex=True)
    width = 1.0 / bins
    filled = counts > 0
    ax.bar(
        edges[:-1][filled],
        acc[filled],
        width=width,
        align="edge",
        color="steelblue",
        edgecolor="white",
        label="accuracy",
    )
    low = np.minimum(acc, mean_conf)[filled]
    ax.bar(
        edges[:-1][filled],
        np.abs(mean_conf - acc)[filled],
        bottom=low,
        width=width,
        align="edge",
        facecolor="none",
        edgecolor="crimson",
        hatch="//",
        lw=0.8,
        label="gap to mean confidence",
    )
    centres = edges[:-1] + width / 2
    ax.plot(centres[filled], mean_conf[filled], "o", color="crimson", ms=3, label="mean confidence")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"Reliability (top label), ECE {ece:.3f}, {bins} bins")
    ax.legend(loc="upper left", fontsize=8)
    hist.bar(edges[:-1], counts, width=width, align="edge", color="grey", edgecolor="white")
    hist.set_xlabel("confidence (largest probability)")
    hist.set_ylabel("images")
    hist.set_xlim(0, 1)
    fig.tight_layout()
    return save(fig, path)
