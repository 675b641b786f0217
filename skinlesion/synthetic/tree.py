"""Writing a synthetic tree: images drawn in worker processes, then the marker, then the
metadata file last."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from skinlesion import __version__, logs
from skinlesion.classes import CLASSES
from skinlesion.ham10000 import METADATA, SYNTHETIC_MARKER
from skinlesion.imaging import ordered_map, resolve_workers
from skinlesion.storage import Store, open_store
from skinlesion.synthetic.draw import render
from skinlesion.synthetic.metadata import ImageSpec, metadata_csv, plan

_OUT: Store | None = None


def _init_writer(out_uri: str) -> None:
    global _OUT
    _OUT = open_store(out_uri)


def _write_chunk(specs: list[ImageSpec]) -> tuple[int, int]:
    """Draw and store a chunk of images (in a worker): (images, bytes) written."""
    assert _OUT is not None
    total = 0
    for spec in specs:
        data = render(spec)
        _OUT.put_bytes(spec.key, data)
        total += len(data)
    return len(specs), total


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
    with logs.Progress("sample-data", images, "image") as bar:
        for n, size in results:
            written += size
            bar.update(n)
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
