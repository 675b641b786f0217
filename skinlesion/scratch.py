"""Local scratch space: where stages stage their inputs and outputs on disk.

The root is set once by the command's entry point (`SKINLESION_SCRATCH`, in a pod an
emptyDir); by default the system's temporary directory. A write that fails because the
scratch filesystem is full becomes one `ScratchFull` line naming the directory; a stage
uploads its outputs from scratch only once they are complete, so it has committed nothing.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from skinlesion.errors import SkinlesionError

ENV = "SKINLESION_SCRATCH"
_root: Path | None = None
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How TensorFlow and HDF5 report ENOSPC: a TF ResourceExhaustedError (also its out-of-
# memory error: told apart by the filesystem's free space) or errno 28 in the message.
_FULL_WORDS = ("No space left on device", "errno = 28", "ResourceExhaustedError")
_NEARLY_FULL = 1 << 20  # bytes: a failed write leaves less than one buffer free


class ScratchFull(SkinlesionError):
    """The scratch filesystem ran out of space (retryable: with more space, or elsewhere)."""


def configure(root: str | Path | None) -> None:
    global _root
    _root = Path(root) if root else None


def root() -> Path:
    return _root or Path(tempfile.gettempdir())


def _free_bytes(path: Path) -> tuple[int, int]:
    """(free, total) bytes of the filesystem holding `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def _is_full(exc: BaseException, where: Path) -> bool:
    """Whether `exc` is a write that failed for want of space on `where`'s filesystem."""
    if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
        pass
    elif not any(w in f"{type(exc).__name__}: {exc}" for w in _FULL_WORDS):
        return False
    try:
        return _free_bytes(where)[0] < _NEARLY_FULL
    except OSError:
        return False


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


@contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A local temporary directory under the configured root, removed on exit."""
    base = root()
    try:
        tmp_dir = tempfile.TemporaryDirectory(prefix=prefix, dir=_root)
    except OSError as exc:
        if exc.errno in _FULL_ERRNOS:
            raise _full(base) from exc
        raise
    with tmp_dir as tmp:
        try:
            yield Path(tmp)
        except SkinlesionError:
            raise
        except Exception as exc:
            if _is_full(exc, Path(tmp)):
                raise _full(base) from exc
            raise


def _full(base: Path) -> ScratchFull:
    free, total = _free_bytes(base)
    return ScratchFull(
        f"local scratch {base} is full (no space left on device: {_mib(free)} free of "
        f"{_mib(total)}); the stage stopped before committing: give it more scratch space "
        f"({ENV}; on Kubernetes the chart's stages.<stage>.scratchSize) and rerun"
    )
