"""The one place where problems with what a person gave us become InputError.

A user-given file (`--config`, an image for predict) or value (`--set`) can be
missing, a directory, unreadable, binary, not UTF-8 or malformed YAML/JSON.
Each of those is bad input (exit 2, never retried), reported as one line that
names the file or the flag, never a traceback or an object repr.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from skinlesion.errors import InputError

_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")  # "<_io.BytesIO object at 0x7f...>"


def describe(exc: BaseException) -> str:
    """One line for a person: what is wrong, without paths we already name or reprs."""
    if isinstance(exc, FileNotFoundError):
        text = "no such file"
    elif isinstance(exc, IsADirectoryError):
        text = "is a directory, not a file"
    elif isinstance(exc, NotADirectoryError):
        text = "a parent of it is a file, not a directory"
    elif isinstance(exc, PermissionError):
        text = "permission denied"
    elif isinstance(exc, OSError):
        text = exc.strerror or str(exc)
    elif isinstance(exc, UnicodeDecodeError):
        text = f"not UTF-8 text (byte {exc.start}; is it a binary file?)"
    elif isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        text = f"invalid YAML: {exc.problem or exc.context}{where}"
    elif isinstance(exc, yaml.YAMLError):
        text = f"invalid YAML: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    elif isinstance(exc, json.JSONDecodeError):
        text = f"invalid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
    else:
        text = str(exc) or type(exc).__name__
    return _REPR.sub("", " ".join(text.split()))


INPUT_ERRORS = (OSError, UnicodeDecodeError, yaml.YAMLError, json.JSONDecodeError)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def one_line(text: str) -> str:
    """`text` with control characters (newlines, tabs, ...) escaped: an error message
    stays one line whatever value it quotes."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


@contextlib.contextmanager
def about(what: str) -> Iterator[None]:
    """Turn the errors of reading/decoding/parsing `what` into `InputError("what: ...")`."""
    try:
        yield
    except INPUT_ERRORS as exc:
        raise InputError(f"{one_line(what)}: {describe(exc)}") from None


def read_bytes(path: str | Path, what: str = "") -> bytes:
    """The bytes of a user-given file; `what` prefixes the path (e.g. '--config')."""
    name = f"{what} {path}" if what else str(path)
    with about(name):
        return Path(path).read_bytes()


def read_text(path: str | Path, what: str = "") -> str:
    data = read_bytes(path, what)
    with about(f"{what} {path}" if what else str(path)):
        return data.decode("utf-8-sig")


def parse_yaml(text: str, what: str) -> Any:
    with about(what):
        if "\0" in text:  # a binary file that happens to decode
            raise InputError(f"{what}: contains NUL bytes (is it a binary file?)")
        return yaml.safe_load(text)


def read_yaml(path: str | Path, what: str = "") -> Any:
    """The parsed YAML of a user-given file (None when it is empty)."""
    return parse_yaml(read_text(path, what), f"{what} {path}" if what else str(path))
