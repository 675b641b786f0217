"""Validation of store keys and run ids built from user data."""

from __future__ import annotations

import re

from skinlesion.errors import InputError

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]{0,199}$")
# Run ids end up in Kubernetes object names and labels: DNS-1123 label, 40 chars max
# so that `<release>-<stage>-<run-id>` stays under 63.
_RUN_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")


def safe_segment(part: str, what: str = "key segment") -> str:
    """One path segment: no '..', no separators, only [A-Za-z0-9._=-]."""
    # fullmatch, not match: '$' would also accept a trailing newline ("abc\n").
    if not isinstance(part, str) or not _SEGMENT.fullmatch(part) or ".." in part:
        raise InputError(f"unsafe {what} {part!r}: only letters, digits and . _ = - are allowed")
    return part


def safe_key(key: str, what: str = "key") -> str:
    """A relative key of safe segments joined by '/' (no absolute paths, no '..')."""
    if not isinstance(key, str) or not key or key.startswith("/") or "\\" in key or "//" in key:
        raise InputError(f"unsafe {what} {key!r}: must be a relative path of safe segments")
    for part in key.split("/"):
        safe_segment(part, what)
    return key


def safe_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise InputError(
            f"invalid run id {run_id!r}: lowercase letters, digits and '-', 1-40 chars, "
            "starting and ending with a letter or digit"
        )
    return run_id
