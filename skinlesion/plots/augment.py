"""Plots of the augment stage: class balance before/after, and a grid of variants."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from skinlesion.classes import CLASSES, DISPLAY_NAMES
from skinlesion.plots import save

SampleRow = tuple[str, np.ndarray, Sequence[np.ndarray], str]  # class, original, variants, note


def class_balance(
    before: Mapping[str, int],
    after: Mapping[str, int],
    target: int,
    exclude: Sequence[str],
    path: Path,
) -> Path:
    """Grouped bars: train images per class before and after balancing."""
    x = np.arange(len(CLASSES))
    b = [before.get(c, 0) for c in CLASSES]
    a = [after.get(c, 0) for c in CLASSES]
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    width = 0.4
    bars_b = ax.bar(x - width / 2, b, width, label="before (originals)", color="#9aa7b8")
    bars_a = ax.bar(x + width / 2, a, width, label="after (originals + variants)", color="#2f6db5")
    ax.bar_label(bars_b, fontsize=7, padding=1)
    ax.bar_label(bars_a, fontsize=7, padding=1)
    ax.axhline(target, color="#c0392b", linestyle="--", linewidth=1, label=f"target {target}")
    labels = [f"{c}\n(excluded)" if c in exclude else c for c in CLASSES]
    ax.set_xticks(x, labels)
    ax.set_ylabel("train images")
    ax.set_title(f"Class balance of the training set: {sum(b)} -> {sum(a)} images")
    ax.set_ylim(0, max([*a, *b, target, 1]) * 1.12)
    ax.legend(fontsize=8, loc="upper left")
    ax.spines[["top", "right"]].set_visible(False)
    return save(fig, path)


def augment_samples(rows: Sequence[SampleRow], path: Path) -> Path:
    """One row per class: the original, then its augmented variants (as written).

    Drawn as one mosaic image (one imshow), which keeps the figure fast to render.
    """
    cols = 1 + max([len(v) for _, _, v, _ in rows] + [1])
    h, w = rows[0][1].shape[:2] if rows else (32, 32)
    gap = max(2, w // 16)
    mosaic = np.full((len(rows) * (h + gap) + gap, cols * (w + gap) + gap, 3), 255, dtype=np.uint8)
    for r, (_, original, variants, _) in enumerate(rows):
        for c, image in enumerate([original, *variants]):
            if image.shape[:2] != (h, w):
                image = np.asarray(Image.fromarray(image).resize((w, h)))
            y, x = gap + r * (h + gap), gap + c * (w + gap)
            mosaic[y : y + h, x : x + w] = image[..., :3]
    cell = 1.25  # inches per image
    fig, ax = plt.subplots(figsize=(cell * cols + 2.2, cell * max(len(rows), 1) + 0.6))
    ax.imshow(mosaic)
    ax.set_axis_off()
    for c in range(cols):
        label = "original" if c == 0 else f"aug{c:04d}"
        ax.text(gap + c * (w + gap) + w / 2, 0, label, ha="center", va="bottom", fontsize=7)
    for r, (name, _, _, note) in enumerate(rows):
        y = gap + r * (h + gap) + h / 2
        ax.text(
            -gap, y, f"{name}\n{DISPLAY_NAMES.get(name, name)}", ha="right", va="center", fontsize=7
        )
        if note:
            ax.text(
                2 * gap + w + w * 0.1,
                y,
                f"not augmented:\n{note}",
                ha="left",
                va="center",
                fontsize=7,
                color="#555555",
            )
    ax.set_title(
        "Augmented variants per class (first source image of each class)", fontsize=9, pad=14
    )
    return save(fig, path)
