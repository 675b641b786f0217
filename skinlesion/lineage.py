"""A stage output's lineage: the upstream prefixes its manifest records, and how the
images a model saw were preprocessed.

A manifest names each input twice: `inputs` (name -> fingerprint) and `sources`
(name -> the URI it was read from). An upstream prefix counts only while it still
holds the output that was read (its fingerprint is the one recorded).
"""

from __future__ import annotations

from typing import Any

from skinlesion.manifest import MANIFEST, read_manifest, stage_input_fingerprint
from skinlesion.results import (
    ChampionResult,
    EvaluateResult,
    PrepareResult,
    Preprocessing,
    parse_result,
)
from skinlesion.storage import Store, open_store

# For a model file without a manifest next to it.
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


_WITH_PREPROCESSING: dict[str, type[ChampionResult | EvaluateResult | PrepareResult]] = {
    "champion": ChampionResult,
    "evaluate": EvaluateResult,
    "prepare": PrepareResult,
}


def model_preprocessing(store: Store) -> Preprocessing | None:
    """How a model prefix's training images were made, from the manifests around it: a
    champion or evaluate manifest records it; a train or finetune manifest leads to the
    prepare output it was validated on (its `val_data` source)."""
    manifest = read_manifest(store)
    if manifest is None:
        return None
    if manifest["stage"] not in _WITH_PREPROCESSING:
        found = upstream(manifest, "val_data")
        if found is None:
            return None
        store, manifest = found
    kind = _WITH_PREPROCESSING.get(manifest["stage"])
    if kind is None:
        return None
    return parse_result(kind, manifest, f"{store.uri}/{MANIFEST}").preprocessing
