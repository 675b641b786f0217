"""Property-based: whatever bytes or strings a user hands the metadata reader, the key
and run-id checks or the config parser, they answer or raise the project's own error
(InputError: one line, exit 2), never a KeyError, UnicodeError or a pandas exception."""

from __future__ import annotations

import string

import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skinlesion import config
from skinlesion.classes import CLASSES
from skinlesion.errors import InputError
from skinlesion.ham10000 import parse_metadata
from skinlesion.keys import safe_key, safe_run_id

HEADER = "lesion_id,image_id,dx,dx_type,age,sex,localization"
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
cell = st.text(alphabet=string.printable + "éü\u00a0\ufeff", max_size=12)
row = st.lists(cell, min_size=0, max_size=9).map(",".join)


def _answers_or_input_error(fn, *args):  # type: ignore[no-untyped-def]
    try:
        return fn(*args)
    except InputError as exc:
        assert "\n" not in str(exc).strip(), str(exc)  # one line
        return None


@FAST
@given(st.binary(max_size=400))
def test_metadata_reader_on_arbitrary_bytes(data: bytes) -> None:
    _answers_or_input_error(parse_metadata, data)


@FAST
@given(st.lists(row, max_size=6), st.sampled_from(["\n", "\r\n"]), st.booleans())
def test_metadata_reader_on_near_valid_csv(rows: list[str], newline: str, bom: bool) -> None:
    text = newline.join([HEADER, *rows])
    data = (b"\xef\xbb\xbf" if bom else b"") + text.encode()
    frame = _answers_or_input_error(parse_metadata, data)
    if frame is not None:
        assert isinstance(frame, pd.DataFrame)
        assert set(frame["dx"]) <= set(CLASSES)


@FAST
@given(st.text(max_size=60))
def test_key_and_run_id_checks(text: str) -> None:
    key = _answers_or_input_error(safe_key, text)
    if key is not None:
        assert not key.startswith("/") and ".." not in key.split("/")
    run_id = _answers_or_input_error(safe_run_id, text)
    if run_id is not None:
        assert run_id == text and "/" not in run_id


field = st.sampled_from(
    ["prepare.image_size", "train.batch_size", "train.backbone", "augment.exclude",
     "evaluate.ece_bins", "promote.min_improvement", "retries", "train.nope", "nope", "a.b.c"]
)  # fmt: skip
value = st.one_of(
    st.integers(-(10**12), 10**12).map(str),
    st.floats(allow_nan=True).map(str),
    st.text(alphabet=string.printable, max_size=15),
    st.sampled_from(["[1", "{a: 1}", "[akiec, bogus]", "null", "true", "~", "'x'", "1e400"]),
)


@FAST
@given(st.lists(st.tuples(field, value), max_size=4), st.sampled_from(sorted(config.PRESETS)))
def test_config_parsing_of_overrides(pairs: list[tuple[str, str]], preset: str) -> None:
    overrides = [f"{k}={v}" for k, v in pairs]
    _answers_or_input_error(config.load_pipeline, preset, None, overrides)
