"""Structured logging, configured once per process at the entrypoint.

JSON lines when stderr is not a terminal (pods), a readable console otherwise.
Every line carries `run_id` and `stage` (bound with `bind`). Progress of every long
step (`Progress`, `progress`) is a tqdm bar on a terminal and, in a pod, a structured
`progress` line at most every `PROGRESS_EVERY_S` seconds plus one when the step ends.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from types import TracebackType
from typing import Any, TypeVar

import structlog

T = TypeVar("T")

_SECRET_KEYS = re.compile(r"(secret|password|token|credential|access_key)", re.IGNORECASE)
_SECRET_VALUES = re.compile(r"(AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN)=\S+")


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Last line of defence: no secret reaches a log line."""
    for key in list(event):
        if _SECRET_KEYS.search(key):
            event[key] = "***"
        elif isinstance(event[key], str):
            event[key] = _SECRET_VALUES.sub(r"\1=***", event[key])
    return event


class _CurrentStderr:
    """Writes to whatever `sys.stderr` is now (tests and tools swap it), not at configure."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def is_terminal() -> bool:
    return sys.stderr.isatty()


def configure(run_id: str = "-", stage: str = "-", level: str = "INFO") -> None:
    """Configure structlog for this process; call once from the entrypoint."""
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if is_terminal()
        else structlog.processors.JSONRenderer(sort_keys=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    bind(run_id=run_id, stage=stage)
    # Quieten libraries that log on their own (absl: TensorFlow's Python side).
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "kubernetes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
    quiet_tensorflow(debug=level == "DEBUG")


# --- TensorFlow's C++ start-up lines ----------------------------------------------------
# On a CPU machine TensorFlow prints "Could not find cuda drivers", "failed call to
# cuInit: ... UNKNOWN ERROR" and oneDNN notices on every start: they read like failures.
# TF_CPP_MIN_LOG_LEVEL (0 all, 1 no INFO, 2 no WARNING, 3 no ERROR) hides the ones logged
# after absl is initialised; the few written before it (at import) are filtered below by
# the same level. A value the user set is kept; --log-level DEBUG shows everything.

TF_LOG_LEVEL = "TF_CPP_MIN_LOG_LEVEL"
_SEVERITY = {"I": 0, "W": 1, "E": 2, "F": 3}
_NATIVE_LINE = re.compile(rb"^([IWEF])\d{4} ")
_PRE_INIT = b"All log messages before absl::InitializeLog() is called"


def quiet_tensorflow(debug: bool) -> None:
    """Set TF_CPP_MIN_LOG_LEVEL (3 by default, 0 with DEBUG) unless already set; call
    before tensorflow is imported. Child processes inherit the value."""
    os.environ.setdefault(TF_LOG_LEVEL, "0" if debug else "3")


def _tf_level() -> int:
    try:
        return int(os.environ.get(TF_LOG_LEVEL, "0"))
    except ValueError:
        return 0


def native_lines_kept(lines: list[bytes], level: int) -> list[bytes]:
    """The lines (of stderr) to keep at TF_CPP_MIN_LOG_LEVEL `level`: C++ log lines below it
    and absl's "messages before InitializeLog" notice go, anything else stays."""
    if level <= 0:
        return lines
    return [
        line
        for line in lines
        if _PRE_INIT not in line
        and not ((m := _NATIVE_LINE.match(line)) and _SEVERITY[m.group(1).decode()] < level)
    ]


def import_tensorflow() -> None:
    """Import tensorflow, filtering (`native_lines_kept`) what it writes to stderr while
    importing, before its own logging honours TF_CPP_MIN_LOG_LEVEL."""
    level = _tf_level()
    if level <= 0 or "tensorflow" in sys.modules:
        import tensorflow

        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = native_lines_kept(captured.read().splitlines(keepends=True), level)
            if kept:
                os.write(2, b"".join(kept))


def bind(**values: Any) -> None:
    structlog.contextvars.bind_contextvars(**values)


def context() -> dict[str, Any]:
    """The values bound to every log line (run_id, stage, ...)."""
    return dict(structlog.contextvars.get_contextvars())


def get(name: str | None = None) -> Any:
    return structlog.get_logger(name)


PROGRESS_EVERY_S = 30.0  # in a pod: at most one progress line per step this often


class Progress:
    """Progress of one long step: a tqdm bar on a terminal; otherwise a `progress` log
    line (task, done, total, percent, rate, elapsed and ETA in seconds) at most every
    `every_s` seconds and one when the step is closed. `clock` is injectable (tests)."""

    def __init__(
        self,
        task: str,
        total: float | None,
        unit: str = "it",
        *,
        every_s: float = PROGRESS_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
        terminal: bool | None = None,
    ) -> None:
        self.task, self.total, self.unit = task, total, unit
        self.every_s, self.clock = every_s, clock
        self.done: float = 0
        self.start = self.last = clock()
        self.closed = False
        self.bar: Any = None
        if is_terminal() if terminal is None else terminal:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                desc=task,
                unit=unit,
                unit_scale=unit == "B",
                dynamic_ncols=True,
                file=sys.stderr,
            )

    def update(self, n: float = 1, **shown: Any) -> None:
        """`n` more units done; `shown` (e.g. loss) goes on the bar, not in the log lines."""
        self.done += n
        if self.bar is not None:
            if shown:
                self.bar.set_postfix(shown, refresh=False)
            self.bar.update(n)
            return
        now = self.clock()
        if now - self.last >= self.every_s:
            self.last = now
            self._line(now)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        else:
            self._line(self.clock(), finished=True)

    def _line(self, now: float, finished: bool = False) -> None:
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else None
        left = None if self.total is None else max(0.0, self.total - self.done)
        eta = round(left / rate, 1) if left is not None and rate else None
        get().info(
            "progress",
            task=self.task,
            done=_num(self.done),
            total=None if self.total is None else _num(self.total),
            unit=self.unit,
            percent=round(100 * self.done / self.total, 1) if self.total else None,
            rate_per_s=None if rate is None else round(rate, 2),
            elapsed_s=round(elapsed, 1),
            eta_s=0.0 if finished and left == 0 else eta,
            finished=finished,
        )

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _num(value: float) -> float | int:
    return int(value) if float(value).is_integer() else round(value, 1)


def progress(
    items: Iterable[T],
    total: float | None,
    desc: str,
    unit: str = "it",
    *,
    clock: Callable[[], float] = time.monotonic,
    terminal: bool | None = None,
) -> Iterator[T]:
    """Yield `items`, counting them on a `Progress` (closed when the items run out)."""
    with Progress(desc, total, unit, clock=clock, terminal=terminal) as bar:
        for item in items:
            yield item
            bar.update()
