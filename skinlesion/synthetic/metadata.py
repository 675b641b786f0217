"""The plan of a synthetic HAM10000 set: every image's id, key and lesion metadata.

The figures are those of the real set (ISIC 2018 task 3 training data, 10,015 images of
7,470 lesions in HAM10000_metadata.csv): class frequencies, images per lesion, the image id
range ISIC_0024306..ISIC_0034320 with ids up to ISIC_0029305 in part 1, the dx order of the
real file, the dx_type mix per class, mean age per class and the localization counts.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from functools import cache

import numpy as np

from skinlesion.errors import InputError
from skinlesion.ham10000 import COLUMNS, PARTS

MIN_IMAGES = 70

# --- the real set's figures ------------------------------------------------------------------

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
