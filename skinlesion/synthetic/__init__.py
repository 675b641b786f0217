"""A synthetic HAM10000-format tree: the real layout, drawn images.

The metadata follows the real set (see `metadata`): column order, image ids in
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

from skinlesion.synthetic.draw import HEIGHT, WIDTH, render, render_lesion
from skinlesion.synthetic.looks import ARCHETYPES, LOOK_ALIKES, lesion_look
from skinlesion.synthetic.metadata import (
    LOCALIZATIONS,
    MIN_IMAGES,
    REAL_IMAGES_PER_CLASS,
    REAL_LESION_SIZES,
    ImageSpec,
    LesionSpec,
    class_sizes,
    metadata_csv,
    plan,
)
from skinlesion.synthetic.tree import write_sample_data

__all__ = [
    "ARCHETYPES",
    "HEIGHT",
    "LOCALIZATIONS",
    "LOOK_ALIKES",
    "MIN_IMAGES",
    "REAL_IMAGES_PER_CLASS",
    "REAL_LESION_SIZES",
    "WIDTH",
    "ImageSpec",
    "LesionSpec",
    "class_sizes",
    "lesion_look",
    "metadata_csv",
    "plan",
    "render",
    "render_lesion",
    "write_sample_data",
]
