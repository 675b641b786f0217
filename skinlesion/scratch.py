"""Local scratch space: where stages stage their inputs and outputs on disk.

The root is set once by the command's entry point (`SKINLESION_SCRATCH`, in a pod an
emptyDir); by default the system's temporary directory.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ENV = "SKINLESION_SCRATCH"
_root: Path | None = None


def configure(root: str | Path | None) -> None:
    global _root
    _root = Path(root) if root else None


@contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A local temporary directory under the configured root, removed on exit."""
    with tempfile.TemporaryDirectory(prefix=prefix, dir=_root) as tmp:
        yield Path(tmp)
