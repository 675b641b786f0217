"""Validation of keys and run ids built from user data (image ids, run ids)."""

from __future__ import annotations

from typing import Any

import pytest

from skinlesion.errors import InputError
from skinlesion.keys import safe_key, safe_run_id, safe_segment


@pytest.mark.parametrize(
    "segment",
    [
        "ISIC_0027419",
        "HAM_0000118",
        "a",
        "0",
        "train-00001.tfrecord",
        "k=v",
        "model.keras",
        "x" * 200,
    ],
)
def test_safe_segment_accepts(segment: str) -> None:
    assert safe_segment(segment) == segment


@pytest.mark.parametrize(
    "segment",
    [
        "",
        ".",
        "..",
        "a..b",
        "a/b",
        "a\\b",
        ".hidden",
        "-flag",
        "_x",
        "a b",
        "a\tb",
        "abc\n",
        "\nabc",
        "nul\x00",
        "naïve",
        "ｆｕｌｌ",
        "a:b",
        "a*b",
        "a%2e",
        "x" * 201,
    ],
    ids=repr,
)
def test_safe_segment_refuses(segment: str) -> None:
    with pytest.raises(InputError, match=r"unsafe image id") as info:
        safe_segment(segment, "image id")
    assert repr(segment) in str(info.value)  # the message shows the offending value


@pytest.mark.parametrize("value", [None, 5, b"abc", ["a"]], ids=repr)
def test_non_strings_are_refused(value: Any) -> None:
    for check in (safe_segment, safe_key, safe_run_id):
        with pytest.raises(InputError):
            check(value)


@pytest.mark.parametrize(
    "key", ["a", "runs/r1/prepare/manifest.json", "raw/HAM10000/HAM10000_images_part_1/ISIC_1.jpg"]
)
def test_safe_key_accepts(key: str) -> None:
    assert safe_key(key) == key


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/",
        "/abs/path",
        "../up",
        "a/../b",
        "a/..",
        "a/./b",
        "a//b",
        "a/",
        "a\\b",
        "C:\\x",
        "a/b c",
        "a/b\n",
        "~/x",
    ],
    ids=repr,
)
def test_safe_key_refuses(key: str) -> None:
    with pytest.raises(InputError, match="unsafe key"):
        safe_key(key)


@pytest.mark.parametrize("run_id", ["r", "1", "nightly-2024-06-01", "a" * 40, "run-7"])
def test_safe_run_id_accepts(run_id: str) -> None:
    assert safe_run_id(run_id) == run_id


@pytest.mark.parametrize(
    "run_id",
    [
        "",
        "-run",
        "run-",
        "Run",
        "run_1",
        "run.1",
        "run/1",
        "run 1",
        "run1\n",
        "a" * 41,
        "../x",
    ],
    ids=repr,
)
def test_safe_run_id_refuses(run_id: str) -> None:
    with pytest.raises(InputError, match="invalid run id") as info:
        safe_run_id(run_id)
    assert "1-40 chars" in str(info.value)  # the rule is spelled out for the user
