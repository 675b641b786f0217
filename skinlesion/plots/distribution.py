"""Class distribution of a split: train vs val image counts per class."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from skinlesion.classes import CLASSES, DISPLAY_NAMES
from skinlesion.plots import plt, save


def class_distribution(
    counts: Mapping[str, Mapping[str, int]], path: Path, title: str = "Class distribution"
) -> Path:
    """Grouped horizontal bars per class (one bar per side, e.g. train and val), each
    labelled with its count and share of that side."""
    sides = list(counts)
    y = np.arange(len(CLASSES))
    height = 0.8 / max(1, len(sides))
    fig, ax = plt.subplots(figsize=(9, 0.75 * len(CLASSES) + 1.2))
    for i, side in enumerate(sides):
        values = [int(counts[side].get(name, 0)) for name in CLASSES]
        total = max(1, sum(values))
        bars = ax.barh(
            y + (i - (len(sides) - 1) / 2) * height, values, height, label=f"{side} ({total})"
        )
        ax.bar_label(
            bars, labels=[f"{v} ({100 * v / total:.1f}%)" for v in values], padding=3, fontsize=8
        )
    ax.set_yticks(y, [f"{name}: {DISPLAY_NAMES[name]}" for name in CLASSES], fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("images")
    ax.set_xlim(0, ax.get_xlim()[1] * 1.2)  # room for the labels
    ax.set_title(title)
    ax.legend(loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return save(fig, path)
