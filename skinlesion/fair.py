"""Champion and candidate scored on the same validation images, for a fair promotion.

The candidate's evaluation left `predictions.csv` (image, lesion, label, probabilities).
The champion's predictions on exactly those images come from the champion's own
`predictions.csv` when it was evaluated on the same images, and otherwise by rescoring
the champion model on the candidate's validation shards with the evaluate stage's own
prediction code. Either way both models' figures then come from one metrics code on one
set of images, and their difference is judged by a paired lesion bootstrap.

Images of lesions the champion trained on (its prepared data's `train` side, from the
image index) are left out of that set: the champion has seen them, so its figures on
them are inflated. When the champion's image index is gone, nothing can be left out and
the comparison says so.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from skinlesion.classes import CLASSES
from skinlesion.data_report import prepared_of, read_index
from skinlesion.errors import InputError
from skinlesion.layout import IMAGE_INDEX_FILE, MODEL_FILE, PREDICTIONS_FILE
from skinlesion.lineage import upstream
from skinlesion.results import ChampionResult, PrepareResult, parse_result
from skinlesion.scratch import scratch_dir
from skinlesion.storage import Store

RECORDED = "the champion's recorded predictions on the same images"
RESCORED = "the champion rescored on the candidate's validation images"


@dataclass(frozen=True)
class Predictions:
    image_ids: list[str]
    lesions: list[str]
    labels: np.ndarray  # [n] class indices
    proba: np.ndarray  # [n, 7]

    def reordered(self, image_ids: list[str], where: str) -> Predictions:
        """The same rows in the order of `image_ids` (which must be exactly this set)."""
        at = {image: i for i, image in enumerate(self.image_ids)}
        if len(at) != len(image_ids) or any(image not in at for image in image_ids):
            raise InputError(f"{where}: not the same validation images")
        return self._rows(np.array([at[image] for image in image_ids], dtype=np.int64))

    def without_lesions(self, lesions: frozenset[str]) -> Predictions:
        """The rows whose lesion is not in `lesions`."""
        return self._rows(np.array([i for i, x in enumerate(self.lesions) if x not in lesions]))

    def _rows(self, order: np.ndarray) -> Predictions:
        order = order.astype(np.int64)
        return Predictions(
            [self.image_ids[i] for i in order],
            [self.lesions[i] for i in order],
            self.labels[order],
            self.proba[order],
        )


def read_predictions(store: Store) -> Predictions:
    """`predictions.csv` of an evaluation (or of a champion copied from one)."""
    where = f"{store.uri}/{PREDICTIONS_FILE}"
    rows = list(csv.DictReader(io.StringIO(store.get_bytes(PREDICTIONS_FILE).decode())))
    if not rows:
        raise InputError(f"{where}: no rows")
    try:
        labels = np.array([CLASSES.index(r["true"]) for r in rows], dtype=np.int64)
        proba = np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows])
        return Predictions(
            [r["image_id"] for r in rows], [r["lesion_id"] for r in rows], labels, proba
        )
    except (KeyError, ValueError) as exc:
        raise InputError(f"{where}: unreadable row ({exc})") from None


def _rescore(champion: Store, evaluation: dict[str, Any], batch_size: int) -> Predictions | None:
    """The champion model on the candidate's validation shards; None when those shards
    are no longer where the candidate's evaluation read them."""
    from skinlesion import shards  # TensorFlow only on this path
    from skinlesion.evaluate import predict_shards
    from skinlesion.model import load_model

    found = upstream(evaluation, "val_data")
    if found is None or not champion.exists(MODEL_FILE):
        return None
    val_store, manifest = found
    data = parse_result(PrepareResult, manifest, f"{val_store.uri} manifest")
    with scratch_dir("skinlesion-fair-") as tmp:
        champion.get_file(MODEL_FILE, tmp / MODEL_FILE)
        net = load_model(tmp / MODEL_FILE)
        paths = shards.fetch_split(val_store, data.shards, "val", tmp / "shards")
        examples, proba = predict_shards(net, paths, batch_size)
    return Predictions(
        [e.image_id for e in examples],
        [e.lesion_id for e in examples],
        np.array([e.label for e in examples], dtype=np.int64),
        proba,
    )


def champion_on_candidate_images(
    candidate: Store, evaluation: dict[str, Any], champion: Store, batch_size: int
) -> tuple[Predictions, Predictions, str] | None:
    """(candidate's, champion's predictions on the same images in the same order, how the
    champion's were obtained), or None when neither way is possible (an old champion
    without predictions whose candidate data is gone)."""
    if not candidate.exists(PREDICTIONS_FILE):
        return None
    mine = read_predictions(candidate)
    if champion.exists(PREDICTIONS_FILE):
        theirs = read_predictions(champion)
        if sorted(theirs.image_ids) == sorted(mine.image_ids):
            ordered = theirs.reordered(mine.image_ids, f"{champion.uri}/{PREDICTIONS_FILE}")
            if np.array_equal(ordered.labels, mine.labels):
                return mine, ordered, RECORDED
    rescored = _rescore(champion, evaluation, batch_size)
    if rescored is None:
        return None
    return mine, rescored.reordered(mine.image_ids, f"{champion.uri} rescored"), RESCORED


def champion_training_lesions(champion: ChampionResult) -> frozenset[str] | None:
    """The lesions the champion trained on (the `train` side of the image index of the data
    it was prepared and evaluated with); None when that index is gone or was never written."""
    up = prepared_of(champion.evaluation_uri, champion.val_data_fingerprint)
    if up is None or not up[0].exists(IMAGE_INDEX_FILE):
        return None
    return frozenset(row["lesion_id"] for row in read_index(up[0]) if row["side"] == "train")


def unseen_by_champion(
    mine: Predictions, theirs: Predictions, trained: frozenset[str] | None
) -> tuple[Predictions, Predictions, dict[str, Any]]:
    """Both sets of predictions without the images of lesions the champion trained on, and
    what was left out (`checked` false: the champion's training lesions are not known)."""
    if trained is None:
        return mine, theirs, {"checked": False, "lesions": 0, "images": 0}
    seen = set(mine.lesions) & trained
    kept = mine.without_lesions(trained)
    images = len(mine.image_ids) - len(kept.image_ids)
    left_out = {"checked": True, "lesions": len(seen), "images": images}
    return kept, theirs.without_lesions(trained), left_out
