"""Bad and odd metadata files through `skinlesion prepare --dry-run`: accepted variants give
the same plan as the plain file; the rest exit 2 with one line naming file, line and field.
Also a 20,000-row file (the large-file path; `make bench` times a million rows)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog

from skinlesion import cli, ham10000
from skinlesion.classes import CLASSES
from skinlesion.storage import FileStore
from tests.bench.metadata_bench import write_metadata

HEADER = ",".join(ham10000.COLUMNS)
# Three lesions per class (one with two images): every class can be split by lesion.
ROWS = [
    f"HAM_{c}{k},ISIC_{c}{k}{i},{dx},histo,50.0,male,back"
    for c, dx in enumerate(CLASSES)
    for k in range(3)
    for i in range(1 + (k == 0))
]


@pytest.fixture
def cli_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def _csv(header: str = HEADER, rows: list[str] = ROWS, end: str = "\n") -> str:
    return end.join([header, *rows]) + end


def _reordered() -> str:
    cols = list(ham10000.COLUMNS)
    order = [cols.index(n) for n in reversed(cols)]
    rows = [",".join(r.split(",")[i] for i in order) for r in ROWS]
    return _csv(",".join(reversed(cols)), rows)


ACCEPTED: dict[str, Callable[[], bytes]] = {
    "utf-8 BOM": lambda: b"\xef\xbb\xbf" + _csv().encode(),
    "CRLF line ends": lambda: _csv(end="\r\n").encode(),
    "reordered columns": lambda: _reordered().encode(),
    "optional dataset column": lambda: _csv(
        HEADER + ",dataset", [r + ",vidir" for r in ROWS]
    ).encode(),
    "surrounding whitespace": lambda: _csv(
        " , ".join(HEADER.split(",")), [" , ".join(r.split(",")) for r in ROWS]
    ).encode(),
    "blank lines": lambda: _csv(rows=[*ROWS[:3], "", *ROWS[3:], ""]).encode(),
}

REJECTED: dict[str, tuple[Callable[[], bytes], str]] = {
    "empty file": (lambda: b"", "HAM10000_metadata.csv: empty file"),
    "header only": (lambda: (HEADER + "\n").encode(), "no rows after the header"),
    "missing column": (
        lambda: _csv(HEADER.replace(",sex", ""), [r.replace(",male", "") for r in ROWS]).encode(),
        "line 1: missing required column 'sex'",
    ),
    "extra column": (
        lambda: _csv(HEADER + ",colour", [r + ",red" for r in ROWS]).encode(),
        "line 1: unknown column 'colour'",
    ),
    "semicolons": (
        lambda: _csv().replace(",", ";").encode(),
        "line 1: the delimiter looks wrong: columns are separated by ';'",
    ),
    "tabs": (lambda: _csv().replace(",", "\t").encode(), "separated by tab"),
    "latin-1": (
        lambda: _csv(rows=[*ROWS[:-1], ROWS[-1].replace("back", "d\xe9s")]).encode("latin-1"),
        f"HAM10000_metadata.csv line {len(ROWS) + 1}: not UTF-8 text",
    ),
    "utf-16": (lambda: _csv().encode("utf-16"), "line 1: UTF-16 text; save it as UTF-8"),
    "row too short": (lambda: _csv(rows=[*ROWS, "HAM_x,ISIC_x"]).encode(), "expected 7 fields"),
    "unknown dx": (
        lambda: _csv(rows=[*ROWS, "HAM_z,ISIC_z,naevus,histo,1,male,back"]).encode(),
        "field 'dx': unknown class 'naevus'",
    ),
    "duplicate image_id": (
        lambda: _csv(rows=[*ROWS, ROWS[0]]).encode(),
        f"line {len(ROWS) + 2}: field 'image_id': duplicate 'ISIC_000' (first on line 2)",
    ),
    "lesion with two dx": (
        lambda: _csv(rows=[*ROWS, "HAM_00,ISIC_new,mel,histo,1,male,back"]).encode(),
        "field 'dx': lesion 'HAM_00' is 'mel' here but 'akiec' on line 2",
    ),
    "path separator in image_id": (
        lambda: _csv(rows=[*ROWS, "HAM_y,a/b,nv,histo,1,male,back"]).encode(),
        "field 'image_id': unsafe value 'a/b'",
    ),
    "dot-dot image_id": (
        lambda: _csv(rows=[*ROWS, "HAM_y,..,nv,histo,1,male,back"]).encode(),
        "field 'image_id': unsafe value '..'",
    ),
    "class with one lesion": (
        lambda: _csv(rows=[r for r in ROWS if not r.startswith(("HAM_61", "HAM_62"))]).encode(),
        "no val images of class(es) vasc (each class needs at least 2 lesions)",
    ),
}


def _dry_run(tmp_path: Path, data: bytes) -> int:
    raw = tmp_path / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / ham10000.METADATA).write_bytes(data)
    return cli.main(["prepare", "--raw", str(raw), "--dry-run"])


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_accepted_variants_give_the_plain_plan(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], cli_logging: None
) -> None:
    assert _dry_run(tmp_path / "plain", _csv().encode()) == 0
    plain = json.loads(capsys.readouterr().out)
    assert _dry_run(tmp_path / "variant", ACCEPTED[case]()) == 0
    assert json.loads(capsys.readouterr().out) == plain


@pytest.mark.parametrize("case", list(REJECTED))
def test_bad_metadata_is_one_line_exit_2(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], cli_logging: None
) -> None:
    make, expected = REJECTED[case]
    assert _dry_run(tmp_path, make()) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip().splitlines()[-1]  # after the JSON log line
    assert err.startswith("skinlesion prepare: error: ") and expected in err, captured.err


def test_dry_run_of_20000_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cli_logging: None
) -> None:
    write_metadata(tmp_path / "raw", 20_000)
    assert cli.main(["prepare", "--raw", str(tmp_path / "raw"), "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert sum(n for side in plan["counts"].values() for n in side.values()) == 20_000
    assert plan["lesions_in_both"] == 0
    assert all(plan["counts"]["val"][c] > 0 for c in CLASSES)
    frame = ham10000.read_metadata(FileStore(tmp_path / "raw"))
    assert str(frame["dx"].dtype) == "category" and len(frame) == 20_000
