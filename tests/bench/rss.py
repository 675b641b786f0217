"""Peak resident memory of a child process and its descendants, sampled from /proc."""

from __future__ import annotations

import threading
from pathlib import Path
from types import TracebackType


def tree_rss_kb(pid: int) -> int:
    """Summed VmRSS of `pid` and its descendants (0 when gone)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
        todo += [int(c) for c in children]
    return total


class PeakTreeRSS:
    """`with PeakTreeRSS(pid) as rss: <wait for the child>`; then `rss.peak_mb`: the
    largest tree sum seen, sampled every `every_s` seconds while the block runs."""

    def __init__(self, pid: int, every_s: float = 0.05) -> None:
        self.pid, self.every_s, self.peak_kb = pid, every_s, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak_kb = max(self.peak_kb, tree_rss_kb(self.pid))
            self._done.wait(self.every_s)

    @property
    def peak_mb(self) -> float:
        return self.peak_kb / 1024

    def __enter__(self) -> PeakTreeRSS:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._done.set()
        self._thread.join()
