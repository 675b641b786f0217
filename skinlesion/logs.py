"""Structured logging, configured once per process at the entrypoint.

JSON lines when stderr is not a terminal (pods), a readable console otherwise.
Every line carries `run_id` and `stage` (bound with `bind`). Progress is a tqdm
bar on a terminal and a log line every few percent in a pod.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, MutableMapping
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


def progress(items: Iterable[T], total: int | None, desc: str, every_pct: int = 10) -> Iterator[T]:
    """Yield items, showing a tqdm bar on a terminal or periodic log lines otherwise."""
    if is_terminal():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, unit="it", dynamic_ncols=True)
        return
    log = get()
    start = time.monotonic()
    step = max(1, (total or 0) * every_pct // 100) if total else 1000
    for done, item in enumerate(items, start=1):
        yield item
        if done % step == 0 or done == total:
            elapsed = time.monotonic() - start
            log.info(
                "progress",
                task=desc,
                done=done,
                total=total,
                rate_per_s=round(done / elapsed, 1) if elapsed > 0 else None,
            )
