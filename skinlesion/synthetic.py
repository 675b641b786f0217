"""A synthetic HAM10000-format tree: the real layout, drawn images.

The metadata follows the real set (HAM10000.md): column order, image ids in
the real range split between the two parts, class frequencies, images per
lesion, plausible dx_type/age/sex/localization. `SYNTHETIC.json` at the root
marks the tree as synthetic; figures computed on it are not medical results.

Each image is a lesion on skin. A lesion's look (size, border irregularity,
palette, dots, clods, nests, vessels, streaks, scale, veil, central patch)
comes from its class's archetype blended with a randomly chosen look-alike
class and jittered, so classes overlap and are learnable but not separable;
every image of a lesion shares its look and differs in position, rotation,
zoom, skin, lighting, hair and blur. Deterministic per seed; images are drawn
in parallel processes, each from its own seeded generator.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from skinlesion import __version__, logs
from skinlesion.classes import CLASSES
from skinlesion.errors import InputError
from skinlesion.ham10000 import COLUMNS, METADATA, PARTS, SYNTHETIC_MARKER
from skinlesion.imaging import ordered_map, resolve_workers
from skinlesion.storage import Store, open_store

WIDTH, HEIGHT = 600, 450
MIN_IMAGES = 70

# --- the real set's figures (HAM10000.md) --------------------------------------------------

FIRST_ID, LAST_PART_1_ID, REAL_IMAGES = 24306, 29305, 10015
REAL_IMAGES_PER_CLASS = {
    "nv": 6705,
    "mel": 1113,
    "bkl": 1099,
    "bcc": 514,
    "akiec": 327,
    "vasc": 142,
    "df": 115,
}
REAL_LESIONS_PER_CLASS = {
    "nv": 5403,
    "mel": 614,
    "bkl": 727,
    "bcc": 327,
    "akiec": 228,
    "vasc": 98,
    "df": 73,
}
REAL_LESION_SIZES = {1: 5514, 2: 1423, 3: 490, 4: 34, 5: 5, 6: 4}  # images per lesion
REAL_LESION_ID_SLOTS = 7673  # HAM_0000000 .. HAM_0007672
CSV_ORDER = ("bkl", "nv", "df", "mel", "vasc", "bcc", "akiec")  # dx order of the real file
DX_TYPES = {
    "nv": {"follow_up": 0.55, "histo": 0.33, "consensus": 0.12},
    "mel": {"histo": 1.0},
    "bkl": {"histo": 0.47, "consensus": 0.46, "confocal": 0.07},
    "bcc": {"histo": 1.0},
    "akiec": {"histo": 1.0},
    "vasc": {"histo": 0.4, "consensus": 0.6},
    "df": {"histo": 0.4, "consensus": 0.6},
}
MEAN_AGE = {"nv": 47, "mel": 61, "bkl": 64, "bcc": 67, "akiec": 67, "vasc": 52, "df": 53}
LOCALIZATIONS = {
    "back": 2192,
    "lower extremity": 2077,
    "trunk": 1404,
    "upper extremity": 1118,
    "abdomen": 1022,
    "face": 745,
    "chest": 407,
    "foot": 319,
    "unknown": 234,
    "neck": 168,
    "scalp": 128,
    "hand": 90,
    "ear": 56,
    "genital": 48,
    "acral": 7,
}
SUN_EXPOSED = ("face", "scalp", "ear", "neck")  # favoured by akiec, bcc, bkl


# --- the dataset plan (metadata only) ---------------------------------------------------------


@dataclass(frozen=True)
class LesionSpec:
    index: int  # seeds the lesion's look
    lesion_id: str
    dx: str
    dx_type: str
    age: str
    sex: str
    localization: str


@dataclass(frozen=True)
class ImageSpec:
    index: int  # seeds the image's nuisance (position, skin, light, hair)
    image_id: str
    key: str
    lesion: LesionSpec
    seed: int


def class_sizes(images: int) -> dict[str, int]:
    """Images per class in the real proportions (largest remainder), >= 2 per class."""
    total = sum(REAL_IMAGES_PER_CLASS.values())
    exact = {c: images * n / total for c, n in REAL_IMAGES_PER_CLASS.items()}
    sizes = {c: max(2, math.floor(x)) for c, x in exact.items()}
    by_remainder = sorted(exact, key=lambda c: exact[c] - math.floor(exact[c]), reverse=True)
    while sum(sizes.values()) < images:
        for c in by_remainder:
            if sum(sizes.values()) < images:
                sizes[c] += 1
    while sum(sizes.values()) > images:  # the minimum of 2 overshot: take from nv
        sizes["nv"] -= 1
    return sizes


@cache
def _size_probabilities(dx: str) -> np.ndarray:
    """P(images per lesion = 1..6) for a class: the real overall shape, tilted
    (p_k ∝ base_k · e^(θ(k-1))) so the mean matches the class's images/lesion."""
    ks = np.arange(1, 7)
    base = np.array([REAL_LESION_SIZES[int(k)] for k in ks], dtype=np.float64)
    target = REAL_IMAGES_PER_CLASS[dx] / REAL_LESIONS_PER_CLASS[dx]
    lo, hi = -5.0, 5.0
    for _ in range(60):  # bisection on θ
        theta = (lo + hi) / 2
        p = base * np.exp(theta * (ks - 1))
        p /= p.sum()
        lo, hi = (theta, hi) if (p * ks).sum() < target else (lo, theta)
    return p


def _lesion_sizes(dx: str, images: int, rng: np.random.Generator) -> list[int]:
    """Split a class's images into lesions; at least 2 lesions (one per split side)."""
    p = _size_probabilities(dx)
    sizes: list[int] = []
    while sum(sizes) < images:
        sizes.append(min(int(rng.choice(6, p=p)) + 1, images - sum(sizes)))
    if len(sizes) == 1 and images >= 2:
        sizes = [images - 1, 1]
    return sizes


def _pick(rng: np.random.Generator, weights: dict[str, float]) -> str:
    names = list(weights)
    p = np.array([weights[n] for n in names], dtype=float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _lesion_meta(dx: str, rng: np.random.Generator) -> tuple[str, str, str, str]:
    """dx_type, age, sex, localization of one lesion."""
    dx_type = _pick(rng, DX_TYPES[dx])
    age = (
        ""
        if rng.random() < 0.006
        else f"{5 * round(np.clip(rng.normal(MEAN_AGE[dx], 15), 0, 85) / 5):.1f}"
    )
    sex = _pick(rng, {"male": 0.54, "female": 0.455, "unknown": 0.005})
    boost = 4.0 if dx in ("akiec", "bcc", "bkl") else 1.0
    places = {k: v * (boost if k in SUN_EXPOSED else 1.0) for k, v in LOCALIZATIONS.items()}
    return dx_type, age, sex, _pick(rng, places)


def plan(images: int, seed: int) -> list[ImageSpec]:
    """The metadata of a synthetic set, rows in the real file's order."""
    if images < MIN_IMAGES:
        raise InputError(f"--images must be >= {MIN_IMAGES} (two lesions per class), got {images}")
    rng = np.random.default_rng([seed, 0])
    lesions: list[tuple[str, int]] = []  # (dx, images)
    for dx, n in class_sizes(images).items():
        lesions += [(dx, k) for k in _lesion_sizes(dx, n, rng)]
    slots = max(REAL_LESION_ID_SLOTS, len(lesions))
    lesion_numbers = np.sort(rng.choice(slots, len(lesions), replace=False))
    image_numbers = FIRST_ID + rng.choice(max(REAL_IMAGES, images), images, replace=False)
    rng.shuffle(lesions)  # lesion ids are not ordered by class
    specs: list[ImageSpec] = []
    for index, ((dx, count), number) in enumerate(zip(lesions, lesion_numbers, strict=True)):
        lesion = LesionSpec(index, f"HAM_{number:07d}", dx, *_lesion_meta(dx, rng))
        for _ in range(count):
            i = len(specs)
            num = int(image_numbers[i])
            part = PARTS[0] if num <= LAST_PART_1_ID else PARTS[1]
            specs.append(
                ImageSpec(i, f"ISIC_{num:07d}", f"{part}/ISIC_{num:07d}.jpg", lesion, seed)
            )
    rank = {dx: i for i, dx in enumerate(CSV_ORDER)}
    return sorted(specs, key=lambda s: (rank[s.lesion.dx], s.lesion.lesion_id, s.image_id))


def metadata_csv(specs: list[ImageSpec]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for s in specs:
        le = s.lesion
        writer.writerow(
            [le.lesion_id, s.image_id, le.dx, le.dx_type, le.age, le.sex, le.localization]
        )
    return buf.getvalue().encode()


# --- lesion looks --------------------------------------------------------------------------------

# Class archetypes, from the dermoscopic features of each diagnosis.
# Shape: radius (fraction of the image height), irregular (border harmonics),
# softness (border blur, fraction of the radius), gamma (centre -> rim colour
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


# --- drawing helpers ------------------------------------------------------------------------------

CANVAS = 264  # canonical lesion frame in pixels, spanning +-1.5 lesion radii
UNIT = CANVAS / 3  # pixels per lesion radius in the canonical frame
ANGLES = 720  # border radius lookup table resolution


@cache
def _polar_grid() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """u, v (units), distance and angle-table index of every canonical pixel."""
    axis = (np.arange(CANVAS, dtype=np.float32) - CANVAS / 2 + 0.5) / UNIT
    u, v = np.meshgrid(axis, axis)
    d = np.hypot(u, v)
    idx = ((np.arctan2(v, u) + np.pi) / (2 * np.pi) * ANGLES).astype(np.int32) % ANGLES
    return u, v, d, idx


def _noise(rng: np.random.Generator, cells: int, size: tuple[int, int]) -> np.ndarray:
    """Smooth noise in about [0, 1]: a cells x cells random grid upsampled bicubically."""
    grid = rng.integers(0, 256, (cells, cells), dtype=np.uint8)  # 8-bit: fast resize
    smooth = Image.fromarray(grid, "L").resize(size, Image.Resampling.BICUBIC)
    return np.asarray(smooth, dtype=np.float32) * np.float32(1 / 255)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _lerp(colour: np.ndarray, target: Any, amount: np.ndarray) -> np.ndarray:
    """colour -> target by amount (per pixel), in place; skipped where amount is all ~0."""
    if float(amount.max()) > 0.004:
        colour += (np.asarray(target, dtype=np.float32) - colour) * amount[..., None]
    return colour


def _border(look: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """Border radius (units) per angle: 1 + random harmonics scaled by irregularity."""
    phi = np.linspace(-np.pi, np.pi, ANGLES, endpoint=False)
    r = np.ones(ANGLES)
    for k in range(2, 9):
        amp = look["irregular"] * rng.normal(0, 1) / k**0.7
        r += amp * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    return np.clip(r, 0.45, 1.45).astype(np.float32)


def _at(border: np.ndarray, phi: np.ndarray | float) -> Any:
    return border[(((np.asarray(phi) + np.pi) / (2 * np.pi) * ANGLES).astype(int)) % ANGLES]


def _xy(rho: Any, phi: Any) -> tuple[Any, Any]:
    """Canonical pixel coordinates of polar (units, radians) positions."""
    return CANVAS / 2 + rho * UNIT * np.cos(phi), CANVAS / 2 + rho * UNIT * np.sin(phi)


def _inside(
    border: np.ndarray, rng: np.random.Generator, n: int, reach: float = 0.92
) -> np.ndarray:
    """n random canonical pixel positions inside the lesion, shape (n, 2)."""
    phi = rng.uniform(-np.pi, np.pi, n)
    return np.stack(_xy(np.sqrt(rng.random(n)) * reach * _at(border, phi), phi), 1)


def _layer_array(layer: Image.Image) -> np.ndarray:
    return np.asarray(layer.filter(ImageFilter.BoxBlur(1)), dtype=np.float32) / 255


# Dot-like structures: (look field, colour, radius range in lesion radii, max count).
DOTS = (
    ("dark_dots", (0.10, 0.07, 0.07), (0.02, 0.045), 70),
    ("red_clods", (0.45, 0.06, 0.18), (0.07, 0.17), 28),
    ("blue_nests", (0.36, 0.42, 0.55), (0.06, 0.14), 14),
    ("light_cysts", (0.93, 0.88, 0.72), (0.03, 0.065), 36),
)


def _dots_layer(
    border: np.ndarray,
    amount: float,
    radii: tuple[float, float],
    count: int,
    rng: np.random.Generator,
) -> np.ndarray | None:
    n = int(rng.poisson(amount * count))
    if n == 0:
        return None
    layer = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(layer)
    sizes = rng.uniform(*radii, n) * UNIT
    for (x, y), r, squash in zip(
        _inside(border, rng, n), sizes, rng.uniform(0.6, 1, n), strict=True
    ):
        draw.ellipse(
            (x - r, y - r * squash, x + r, y + r * squash), fill=int(rng.integers(170, 256))
        )
    return _layer_array(layer)


def _vessels_layer(
    border: np.ndarray, amount: float, rng: np.random.Generator
) -> np.ndarray | None:
    """Branching red vessels (arborizing in bcc), drawn as random-walk trees."""
    trees = int(rng.poisson(amount * 6))
    if trees == 0:
        return None
    layer = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(layer)
    for x, y in _inside(border, rng, trees, reach=0.7):
        stack = [(x, y, rng.uniform(0, 2 * np.pi), int(rng.integers(2, 4)), 0)]
        while stack:
            x0, y0, angle, width, depth = stack.pop()
            if depth > 7 or width < 1:
                continue
            angle += rng.normal(0, 0.45)
            length = rng.uniform(0.06, 0.17) * UNIT
            x1, y1 = x0 + length * math.cos(angle), y0 + length * math.sin(angle)
            draw.line((x0, y0, x1, y1), fill=230, width=width)
            stack.append((x1, y1, angle, width, depth + 1))
            if rng.random() < 0.35:
                turn = rng.choice((-1, 1)) * rng.uniform(0.4, 1.0)
                stack.append((x1, y1, angle + turn, width - 1, depth + 1))
    return _layer_array(layer)


def _streaks_layer(
    border: np.ndarray, amount: float, rng: np.random.Generator
) -> np.ndarray | None:
    """Radial streaks / pseudopods at the periphery (reaching beyond the border)."""
    n = int(rng.poisson(amount * 24))
    if n == 0:
        return None
    layer = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(layer)
    phi = rng.uniform(-np.pi, np.pi) + rng.normal(0, 1.2, n)  # clustered on one side
    r = _at(border, phi)
    x0, y0 = _xy(0.8 * r, phi)
    x1, y1 = _xy(rng.uniform(1.02, 1.22, n) * r, phi)
    tip = 0.02 * UNIT
    for i in range(n):
        draw.line((x0[i], y0[i], x1[i], y1[i]), fill=200, width=int(rng.integers(1, 3)))
        draw.ellipse((x1[i] - tip, y1[i] - tip, x1[i] + tip, y1[i] + tip), fill=200)
    return _layer_array(layer)


def _network(look: dict[str, Any], mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Reticular pigment network: darkening factor of thin, warped lattice lines in patches."""
    u, v, _, _ = _polar_grid()
    size = (CANVAS, CANVAS)
    f, turn = rng.uniform(16, 24), rng.uniform(0, np.pi)
    uw = u * math.cos(turn) + v * math.sin(turn) + 0.12 * _noise(rng, 14, size)
    vw = v * math.cos(turn) - u * math.sin(turn) + 0.12 * _noise(rng, 14, size)
    lines = (1 - np.abs(np.sin(f * uw)) * np.abs(np.sin(f * vw))) ** 8
    where = _smoothstep((_noise(rng, 5, size) - 0.25) * 2) * mask
    return 1 - 0.5 * look["network"] * lines * where


def render_lesion(look: dict[str, Any], rng: np.random.Generator) -> Image.Image:
    """The lesion in its canonical frame as RGBA (alpha = lesion coverage)."""
    _, _, d, idx = _polar_grid()
    size = (CANVAS, CANVAS)
    border = _border(look, rng)
    t = d / border[idx]  # 1 on the border
    mask = _smoothstep((1 - t) / max(look["softness"], 0.01) + 0.5)
    inner = _smoothstep((0.95 - t) / 0.15)
    # Base: centre -> rim colour, blotches, uneven pigment.
    rgb = np.empty((*d.shape, 3), dtype=np.float32)
    rgb[:] = look["centre"]
    _lerp(rgb, look["rim"], np.clip(t, 0, 1) ** look["gamma"])
    _lerp(
        rgb,
        look["blotch"],
        _smoothstep((_noise(rng, 5, size) - 1 + look["blotch_amount"]) * 4) * inner,
    )
    rgb *= (0.9 + 0.2 * _noise(rng, 9, size))[..., None]
    if look["network"] > 0.05:
        rgb *= _network(look, mask, rng)[..., None]
    # Blue-white veil and whitish central scar (dermatofibroma).
    veil = _smoothstep((_noise(rng, 4, size) - (1 - 0.8 * look["veil"])) * 3) * inner
    _lerp(rgb, (0.52, 0.58, 0.70), 0.8 * veil)
    _lerp(rgb, (0.95, 0.92, 0.90), _smoothstep((0.6 - t) / 0.3) * look["patch"])
    # Surface scale: white-yellow flakes in patches.
    if look["scale"] > 0.05:
        flakes = rng.random((CANVAS // 3, CANVAS // 3), dtype=np.float32) > 0.5
        flakes_full = np.repeat(np.repeat(flakes, 3, 0), 3, 1).astype(np.float32)
        patches = _smoothstep((_noise(rng, 6, size) - (1 - look["scale"])) * 3)
        _lerp(rgb, (0.95, 0.92, 0.82), 0.85 * patches * (0.4 + 0.6 * flakes_full) * mask)
    for name, colour, radii, count in DOTS:
        layer = _dots_layer(border, look[name], radii, count, rng)
        if layer is not None:
            _lerp(rgb, colour, 0.9 * layer)
    vessels = _vessels_layer(border, look["vessels"], rng)
    if vessels is not None:
        _lerp(rgb, (0.72, 0.12, 0.16), 0.85 * vessels)
    alpha = mask * look["opacity"]
    streaks = _streaks_layer(border, look["streaks"], rng)
    if streaks is not None:
        _lerp(rgb, (0.22, 0.13, 0.10), streaks)
        alpha = np.maximum(alpha, 0.9 * streaks)
    rgba = np.empty((*d.shape, 4), dtype=np.uint8)
    rgba[..., :3] = np.clip(rgb, 0, 1) * 255
    rgba[..., 3] = alpha * 255
    return Image.fromarray(rgba, "RGBA")


def _skin(rng: np.random.Generator) -> Image.Image:
    """Skin background: tone, mottling and redness, as an RGBA image."""
    light, tan = np.array([0.95, 0.78, 0.72]), np.array([0.76, 0.55, 0.44])
    tone = light + (tan - light) * rng.random() ** 1.5 + rng.normal(0, 0.025, 3)
    size = (WIDTH // 2, HEIGHT // 2)
    mottle = 0.93 + 0.08 * _noise(rng, 6, size) + 0.06 * _noise(rng, 24, size)
    red = _smoothstep(_noise(rng, 5, size) - 0.4) * rng.uniform(0, 0.12)
    rgb = tone.astype(np.float32) * mottle[..., None]
    rgb[..., 0] += red
    rgb[..., 1:] -= red[..., None] * 0.5
    half = Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8), "RGB")
    return half.resize((WIDTH, HEIGHT), Image.Resampling.BILINEAR).convert("RGBA")


def _place(
    canvas: Image.Image, lesion: Image.Image, look: dict[str, Any], rng: np.random.Generator
) -> None:
    """Composite the canonical lesion onto `canvas`, moved, rotated and scaled."""
    radius = look["radius"] * HEIGHT * math.exp(rng.normal(0, 0.12))
    cx = WIDTH / 2 + np.clip(rng.normal(0, 0.09), -0.2, 0.2) * WIDTH
    cy = HEIGHT / 2 + np.clip(rng.normal(0, 0.09), -0.2, 0.2) * HEIGHT
    angle = rng.uniform(0, 2 * np.pi)
    kx, ky = UNIT / (radius * look["aspect"]), UNIT / radius
    c, s = math.cos(angle), math.sin(angle)
    a, b, d, e = kx * c, kx * s, -ky * s, ky * c  # image offset -> canonical offset
    # Only the lesion's bounding box is transformed (the frame reaches 1.5 radii).
    reach = 1.5 * radius * look["aspect"]
    x0, y0 = max(0, int(cx - reach)), max(0, int(cy - reach))
    x1, y1 = min(WIDTH, int(cx + reach) + 1), min(HEIGHT, int(cy + reach) + 1)
    if x1 <= x0 or y1 <= y0:
        return
    ox, oy = x0 - cx, y0 - cy
    coeffs = (a, b, CANVAS / 2 + a * ox + b * oy, d, e, CANVAS / 2 + d * ox + e * oy)
    placed = lesion.transform(
        (x1 - x0, y1 - y0), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR
    )
    canvas.alpha_composite(placed, dest=(x0, y0))


def _hair(img: Image.Image, rng: np.random.Generator) -> None:
    if rng.random() > 0.45:
        return
    draw = ImageDraw.Draw(img)
    for _ in range(1 + int(rng.poisson(3))):
        x, y = rng.uniform(0, WIDTH), rng.uniform(0, HEIGHT)
        angle, bend = rng.uniform(0, 2 * np.pi), rng.normal(0, 0.08)
        points = [(x, y)]
        for _ in range(int(rng.integers(6, 16))):
            angle += bend + rng.normal(0, 0.05)
            x, y = x + 25 * math.cos(angle), y + 25 * math.sin(angle)
            points.append((x, y))
        shade = int(rng.integers(15, 70))
        draw.line(
            points,
            fill=(shade, int(shade * 0.8), int(shade * 0.7)),
            width=int(rng.integers(1, 4)),
            joint="curve",
        )


@cache
def _radius_grid() -> np.ndarray:
    """Distance from the centre of a half-resolution frame, in half image heights."""
    h, w = HEIGHT // 2, WIDTH // 2
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.hypot((x - w / 2) / (h / 2), (y - h / 2) / (h / 2))


def _lighting(rng: np.random.Generator) -> Image.Image:
    """Light field (gain, gradient, white balance, vignette, sometimes the scope's dark
    rim) as an RGB image to multiply with."""
    r = _radius_grid()
    ramp = np.linspace(-1, 1, r.shape[1], dtype=np.float32)[None, :] * rng.normal(0, 0.05)
    field = (
        rng.uniform(0.85, 0.97)
        * (1 + ramp)
        * (1 - rng.uniform(0, 0.35) * _smoothstep((r - 0.7) / 0.9))
    )
    if rng.random() < 0.3:
        edge = rng.uniform(1.0, 1.3)
        field = field * (0.08 + 0.92 * _smoothstep((edge - r) / 0.06))
    balance = np.exp(rng.normal(0, 0.03, 3)).astype(np.float32)
    rgb = np.clip(field[..., None] * balance, 0, 1) * 255
    half = Image.fromarray(rgb.astype(np.uint8), "RGB")
    return half.resize((WIDTH, HEIGHT), Image.Resampling.BILINEAR)


def render(spec: ImageSpec) -> bytes:
    """One 600x450 JPEG of `spec` (deterministic)."""
    look_rng = np.random.default_rng([spec.seed, 1, spec.lesion.index])
    look = lesion_look(spec.lesion.dx, look_rng)
    lesion = render_lesion(look, look_rng)
    rng = np.random.default_rng([spec.seed, 2, spec.index])
    canvas = _skin(rng)
    _place(canvas, lesion, look, rng)
    img = canvas.convert("RGB")
    _hair(img, rng)
    img = img.filter(ImageFilter.BoxBlur(rng.uniform(0.4, 1.2)))  # focus
    img = ImageChops.multiply(img, _lighting(rng))
    amp = int(rng.integers(2, 7))  # sensor grain
    grain = Image.fromarray(rng.integers(0, 2 * amp + 1, (HEIGHT, WIDTH), dtype=np.uint8), "L")
    img = ImageChops.add(img, grain.convert("RGB"), offset=-amp)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(rng.integers(85, 96)))
    return buf.getvalue()


# --- writing the tree -------------------------------------------------------------------------

_OUT: Store | None = None


def _init_writer(out_uri: str) -> None:
    global _OUT
    _OUT = open_store(out_uri)


def _write_chunk(specs: list[ImageSpec]) -> int:
    """Draw and store a chunk of images (in a worker); returns the bytes written."""
    assert _OUT is not None
    total = 0
    for spec in specs:
        data = render(spec)
        _OUT.put_bytes(spec.key, data)
        total += len(data)
    return total


def _chunks(specs: list[ImageSpec], size: int) -> Iterator[list[ImageSpec]]:
    for i in range(0, len(specs), size):
        yield specs[i : i + size]


def write_sample_data(out: Store, images: int, seed: int, workers: int = 0) -> dict[str, Any]:
    """Write a synthetic HAM10000 tree of `images` images to `out`; returns a summary."""
    log = logs.get()
    start = time.monotonic()
    specs = plan(images, seed)
    counts = {c: sum(1 for s in specs if s.lesion.dx == c) for c in CLASSES}
    lesions = len({s.lesion.lesion_id for s in specs})
    chunk = 8
    written = 0
    results = ordered_map(
        _write_chunk, _chunks(specs, chunk), resolve_workers(workers), _init_writer, (out.uri,)
    )
    for n in logs.progress(results, math.ceil(images / chunk), "sample-data"):
        written += n
    marker = {
        "synthetic": True,
        "note": "SYNTHETIC images drawn by skinlesion.synthetic, not dermatoscopic photographs; "
        "figures computed on them are not medical results.",
        "generator": f"skinlesion {__version__}",
        "seed": seed,
        "images": images,
        "lesions": lesions,
        "counts": counts,
    }
    out.put_bytes(SYNTHETIC_MARKER, (json.dumps(marker, indent=2) + "\n").encode())
    out.put_bytes(METADATA, metadata_csv(specs))  # last: the tree is complete once it exists
    seconds = time.monotonic() - start
    summary = {
        "uri": out.uri,
        "synthetic": True,
        "images": images,
        "lesions": lesions,
        "seed": seed,
        "counts": counts,
        "megabytes": round(written / 1e6, 1),
        "seconds": round(seconds, 1),
        "images_per_s": round(images / seconds, 1),
    }
    log.info("sample_data_done", **{k: v for k, v in summary.items() if k != "counts"}, **counts)
    return summary
