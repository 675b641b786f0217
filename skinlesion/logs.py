"""Structured logging, configured once per process at the entrypoint.

JSON lines when stderr is not a terminal (pods), a readable console otherwise.
Every line carries `run_id` and `stage` (bound with `bind`). Progress is a tqdm
bar on a terminal and a log line every few percent in a pod.
"""

from __future__ import annotations

import logging
import re
import sys
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
    # Quieten libraries that log on their own.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "kubernetes", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def bind(**values: Any) -> None:
    structlog.contextvars.bind_contextvars(**values)


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
