"""A stage output's lineage: the upstream prefixes its manifest records, and how the
images a model saw were preprocessed.

A manifest names each input twice: `inputs` (name -> fingerprint) and `sources`
(name -> the URI it was read from). An upstream prefix counts only while it still
holds the output that was read (its fingerprint is the one recorded).
"""

from __future__ import annotations

from typing import Any

from skinlesion.manifest import read_manifest, stage_input_fingerprint
from skinlesion.storage import Store, open_store

# For manifests that do not record them (written before they were settings).
DEFAULT_RESIZE = "squash"
DEFAULT_JPEG_QUALITY = 95


def upstream(manifest: dict[str, Any], name: str) -> tuple[Store, dict[str, Any]] | None:
    """(prefix, committed manifest) of the input `name` this manifest was built from."""
    uri = (manifest.get("sources") or {}).get(name)
    wanted = (manifest.get("inputs") or {}).get(name)
    if not uri or not wanted:
        return None
    store = open_store(uri)
    found = read_manifest(store)
    if found is None or stage_input_fingerprint(found) != wanted:
        return None
    return store, found


def preprocessing_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """How the images a model saw were resized: from a prepare manifest, or the
    `preprocessing` an evaluate or champion manifest recorded."""
    if isinstance(manifest.get("preprocessing"), dict):
        prep = manifest["preprocessing"]
        return {
            "image_size": prep.get("image_size"),
            "resize": prep.get("resize", DEFAULT_RESIZE),
            "jpeg_quality": prep.get("jpeg_quality", DEFAULT_JPEG_QUALITY),
        }
    settings = manifest.get("settings", {}) or {}
    return {
        "image_size": manifest.get("image_size", settings.get("image_size")),
        "resize": settings.get("resize", DEFAULT_RESIZE),
        "jpeg_quality": settings.get("jpeg_quality", DEFAULT_JPEG_QUALITY),
    }


def model_preprocessing(store: Store) -> dict[str, Any] | None:
    """How a model prefix's training images were resized, from the manifests around it:
    a champion or evaluate manifest records it; a train or finetune manifest leads to the
    prepare output it was validated on (its `val_data` source)."""
    manifest = read_manifest(store)
    if manifest is None:
        return None
    if isinstance(manifest.get("preprocessing"), dict):
        return preprocessing_of(manifest)
    prepared = upstream(manifest, "val_data")
    return preprocessing_of(prepared[1]) if prepared is not None else None
