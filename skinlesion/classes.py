"""The seven HAM10000 diagnosis classes in canonical order (index = label)."""

from __future__ import annotations

CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
NUM_CLASSES = len(CLASSES)
INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}
MELANOMA = "mel"

DISPLAY_NAMES: dict[str, str] = {
    "akiec": "Actinic keratoses / Bowen's disease",
    "bcc": "Basal cell carcinoma",
    "bkl": "Benign keratosis-like lesions",
    "df": "Dermatofibroma",
    "mel": "Melanoma",
    "nv": "Melanocytic nevi",
    "vasc": "Vascular lesions",
}
