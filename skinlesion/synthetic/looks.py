"""Lesion looks: each class's archetype, blended towards a look-alike class and jittered."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from skinlesion.classes import CLASSES

# curve), opacity. Colours: RGB in 0..1. Textures: amounts in 0..1.
SHAPE = ("radius", "irregular", "softness", "gamma", "opacity")
COLOURS = ("centre", "rim", "blotch")
TEXTURES = ("blotch_amount", "patch", "network", "dark_dots", "red_clods", "blue_nests",
            "light_cysts", "vessels", "streaks", "scale", "veil")  # fmt: skip
# fmt: off
_SHAPES = {
    #        radius irregular softness gamma opacity
    "nv":    (0.20, 0.05, 0.10, 1.6, 0.92),  # small, round, regular
    "mel":   (0.30, 0.17, 0.06, 1.0, 0.95),  # large, asymmetric
    "bkl":   (0.25, 0.10, 0.03, 1.2, 0.92),  # sharp "stuck-on" border
    "bcc":   (0.21, 0.11, 0.10, 1.5, 0.80),  # translucent
    "akiec": (0.23, 0.13, 0.20, 1.0, 0.88),  # ill-defined
    "df":    (0.15, 0.05, 0.16, 0.8, 0.90),  # small, fuzzy
    "vasc":  (0.16, 0.06, 0.04, 1.0, 0.95),  # well demarcated
}
_COLOURS = {
    #         centre              rim                 blotch
    "nv":    ((0.38, 0.24, 0.17), (0.56, 0.38, 0.28), (0.30, 0.19, 0.14)),  # brown
    "mel":   ((0.20, 0.12, 0.10), (0.50, 0.33, 0.26), (0.09, 0.06, 0.07)),  # dark, black
    "bkl":   ((0.68, 0.52, 0.36), (0.58, 0.42, 0.28), (0.47, 0.33, 0.22)),  # tan, waxy
    "bcc":   ((0.90, 0.74, 0.74), (0.86, 0.64, 0.62), (0.62, 0.47, 0.52)),  # pink, pearly
    "akiec": ((0.78, 0.31, 0.30), (0.84, 0.48, 0.44), (0.68, 0.27, 0.27)),  # red, rough
    "df":    ((0.62, 0.45, 0.36), (0.55, 0.37, 0.28), (0.45, 0.30, 0.22)),  # brown ring
    "vasc":  ((0.60, 0.13, 0.26), (0.68, 0.21, 0.30), (0.38, 0.08, 0.24)),  # red-purple
}
_TEXTURES = {
    #        blotch patch network dots clods nests cysts vessels streaks scale veil
    "nv":    (0.20, 0.00, 0.60, 0.15, 0.00, 0.00, 0.00, 0.03, 0.10, 0.00, 0.00),
    "mel":   (0.60, 0.05, 0.40, 0.60, 0.05, 0.10, 0.00, 0.10, 0.45, 0.05, 0.65),
    "bkl":   (0.35, 0.00, 0.15, 0.30, 0.00, 0.00, 0.90, 0.10, 0.00, 0.30, 0.00),
    "bcc":   (0.20, 0.10, 0.00, 0.05, 0.05, 0.90, 0.10, 0.90, 0.00, 0.05, 0.15),
    "akiec": (0.35, 0.00, 0.00, 0.10, 0.10, 0.00, 0.00, 0.35, 0.00, 1.00, 0.00),
    "df":    (0.15, 0.95, 0.55, 0.05, 0.00, 0.00, 0.00, 0.10, 0.00, 0.05, 0.00),
    "vasc":  (0.40, 0.00, 0.00, 0.00, 1.00, 0.05, 0.00, 0.10, 0.00, 0.00, 0.10),
}
# fmt: on
ARCHETYPES: dict[str, dict[str, Any]] = {
    name: {
        **dict(zip(SHAPE, _SHAPES[name], strict=True)),
        **dict(zip(COLOURS, _COLOURS[name], strict=True)),
        **dict(zip(TEXTURES, _TEXTURES[name], strict=True)),
    }
    for name in CLASSES
}
# Classes a lesion may partly look like (the clinically confusable ones).
LOOK_ALIKES = {
    "nv": ("mel", "bkl", "df"),
    "mel": ("nv", "bkl"),
    "bkl": ("mel", "akiec", "nv"),
    "bcc": ("akiec", "bkl", "vasc"),
    "akiec": ("bcc", "bkl"),
    "df": ("nv", "bkl"),
    "vasc": ("bcc", "mel"),
}
# Blend weight towards the look-alike: BLEND_MAX · Beta(1, BLEND_BETA). Above 0.5
# a lesion looks more like the other class: the overlap that keeps it imperfect.
BLEND_MAX, BLEND_BETA = 0.75, 4.0
UNBOUNDED = ("radius", "irregular", "softness", "gamma")


def lesion_look(dx: str, rng: np.random.Generator) -> dict[str, Any]:
    """One lesion's look: its archetype blended towards a look-alike, then jittered."""
    other = LOOK_ALIKES[dx][int(rng.integers(len(LOOK_ALIKES[dx])))]
    w = BLEND_MAX * rng.beta(1.0, BLEND_BETA)
    a, b = ARCHETYPES[dx], ARCHETYPES[other]
    look: dict[str, Any] = {}
    shade = math.exp(rng.normal(0, 0.10))  # darker or lighter lesion overall
    for name, value in a.items():
        mixed = (1 - w) * np.asarray(value, dtype=np.float32) + w * np.asarray(b[name], np.float32)
        if name in COLOURS:
            jitter = np.exp(rng.normal(0, 0.06, 3)).astype(np.float32)  # keeps the hue
            look[name] = np.clip(mixed * np.float32(shade) * jitter, 0.02, 0.98)
        elif name in UNBOUNDED:
            look[name] = float(mixed * math.exp(rng.normal(0, 0.2)))
        else:
            look[name] = float(np.clip(mixed * math.exp(rng.normal(0, 0.3)), 0, 1))
    look["aspect"] = 1 + abs(rng.normal(0, 0.15))
    return look
