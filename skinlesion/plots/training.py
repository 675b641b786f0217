"""Training curves: loss and accuracy, train and val, per epoch, for one or two phases."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.ticker import MaxNLocator

from skinlesion.plots import plt, save

# Per phase: (line colour, label). Train solid, val dashed.
_COLOURS = {"top": "tab:blue", "finetune": "tab:orange"}


def training_curves(
    phases: Sequence[tuple[str, Mapping[str, Sequence[Any]]]], path: Path, title: str = ""
) -> Path:
    """Plot `[(phase, history), ...]` on one epoch axis that continues across phases.

    A history maps "epoch" (1-based, within its phase), "loss", "accuracy", "val_loss"
    and "val_accuracy" to per-epoch lists. The best val accuracy of each phase is marked
    and a dotted line shows where a phase starts.
    """
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    offset = 0
    for phase, hist in phases:
        epochs = [offset + int(e) for e in hist.get("epoch", [])]
        if not epochs:
            continue
        colour = _COLOURS.get(phase, "tab:green")
        for ax, key in ((ax_loss, "loss"), (ax_acc, "accuracy")):
            if key in hist:
                ax.plot(epochs, hist[key], "-o", ms=3, color=colour, label=f"{phase} train")
            if f"val_{key}" in hist:
                ax.plot(epochs, hist[f"val_{key}"], "--s", ms=3, color=colour, label=f"{phase} val")
            if offset:
                ax.axvline(offset + 0.5, color="grey", ls=":", lw=1)
        val_acc = list(hist.get("val_accuracy", []))
        if val_acc:
            best = max(range(len(val_acc)), key=lambda i: val_acc[i])
            ax_acc.plot(epochs[best], val_acc[best], "*", ms=11, color=colour)
            ax_acc.annotate(
                f"best {val_acc[best]:.3f}",
                (epochs[best], val_acc[best]),
                textcoords="offset points",
                xytext=(0, -14),
                ha="center",
                va="top",
                fontsize=8,
                color=colour,
            )
        offset = epochs[-1]
    ax_loss.set_title("loss (categorical cross-entropy)")
    ax_acc.set_title("accuracy")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch (continued across phases)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.set_ylim(0, 1.02)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save(fig, path)
