"""Argument helpers the CLI's command modules share: store flags, bounded integers."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from skinlesion.errors import InputError
from skinlesion.storage import Store, open_store

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def store_flag(flag: str, uri: str) -> Store:
    """The store a flag names; a bad URI or path is an error naming the flag."""
    try:
        return open_store(uri)
    except InputError as exc:
        raise InputError(f"{flag}: {exc}") from None


def int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (argparse names the flag)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {value}")
        return value

    return parse


def default_store() -> str:
    """`./store` as a file URI: the store of `make run`."""
    return (Path.cwd() / "store").as_uri()
