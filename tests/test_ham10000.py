"""HAM10000 tree reading: every validation error names file, line and field."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from skinlesion import ham10000
from skinlesion.errors import DataError
from skinlesion.storage import FileStore, ObjectInfo, Store

HEADER = "lesion_id,image_id,dx,dx_type,age,sex,localization"
ROWS = [
    "HAM_0000118,ISIC_0027419,bkl,histo,80.0,male,scalp",
    "HAM_0000118,ISIC_0025030,bkl,histo,80.0,male,scalp",
    "HAM_0002730,ISIC_0026769,nv,follow_up,,female,back",
    "HAM_0001466,ISIC_0031633,mel,histo,75.0,male,ear",
]


def jpeg(size: tuple[int, int] = (12, 9)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (180, 120, 100)).save(buf, "JPEG")
    return buf.getvalue()


def write_tree(store: Store, csv_text: str, images: list[str] | None = None) -> Store:
    """A tree whose images are those named (default: every image_id of ROWS)."""
    store.put_bytes(ham10000.METADATA, csv_text.encode())
    for image_id in images if images is not None else [r.split(",")[1] for r in ROWS]:
        part = ham10000.PARTS[0] if image_id <= "ISIC_0029305" else ham10000.PARTS[1]
        store.put_bytes(f"{part}/{image_id}.jpg", jpeg())
    return store


def csv_of(header: str = HEADER, rows: list[str] = ROWS) -> str:
    return "\n".join([header, *rows]) + "\n"


@pytest.fixture
def tree(tmp_path: Path) -> Store:
    return write_tree(FileStore(tmp_path / "raw"), csv_of())


def error_of(store: Store, **kwargs: Any) -> str:
    with pytest.raises(DataError) as info:
        ham10000.load(store, **kwargs)
    message = str(info.value)
    assert "\n" not in message  # one clear line
    return message


def test_valid_tree_keeps_csv_order_lines_and_keys(tree: Store) -> None:
    data = ham10000.load(tree)
    frame = data.metadata
    assert list(frame["image_id"]) == [r.split(",")[1] for r in ROWS]
    assert list(frame["line"]) == [2, 3, 4, 5]
    assert frame.loc[0, "key"] == "HAM10000_images_part_1/ISIC_0027419.jpg"
    assert frame.loc[3, "key"] == "HAM10000_images_part_2/ISIC_0031633.jpg"
    assert frame["age"].isna().sum() == 1  # blank age is allowed
    assert data.synthetic is False


def test_eight_column_form_with_dataset_is_accepted(tmp_path: Path) -> None:
    rows = [f"{r},vidir_modern" for r in ROWS]
    store = write_tree(FileStore(tmp_path), csv_of(HEADER + ",dataset", rows))
    frame = ham10000.load(store).metadata
    assert list(frame["dataset"]) == ["vidir_modern"] * 4
    assert len(frame) == 4


def test_byte_order_mark_and_crlf_are_accepted(tmp_path: Path) -> None:
    text = "\ufeff" + csv_of().replace("\n", "\r\n")
    store = write_tree(FileStore(tmp_path), text)
    assert len(ham10000.load(store).metadata) == 4


def test_missing_column(tmp_path: Path) -> None:
    header = HEADER.replace("dx,", "")
    rows = [",".join(p for i, p in enumerate(r.split(",")) if i != 2) for r in ROWS]
    message = error_of(write_tree(FileStore(tmp_path), csv_of(header, rows)))
    assert message.startswith("HAM10000_metadata.csv line 1: missing required column 'dx'")


def test_unknown_extra_column(tmp_path: Path) -> None:
    rows = [f"{r},x" for r in ROWS]
    message = error_of(write_tree(FileStore(tmp_path), csv_of(HEADER + ",colour", rows)))
    assert message.startswith("HAM10000_metadata.csv line 1: unknown column 'colour'")


def test_unknown_class_names_line_and_field(tmp_path: Path) -> None:
    rows = [*ROWS[:2], ROWS[2].replace(",nv,", ",melanoma,"), ROWS[3]]
    message = error_of(write_tree(FileStore(tmp_path), csv_of(rows=rows)))
    assert message.startswith(
        "HAM10000_metadata.csv line 4: field 'dx': unknown class 'melanoma' (expected one of akiec"
    )


def test_duplicate_image_id(tmp_path: Path) -> None:
    rows = [*ROWS, "HAM_0009999,ISIC_0025030,nv,histo,40.0,male,back"]
    message = error_of(write_tree(FileStore(tmp_path), csv_of(rows=rows)))
    assert message == (
        "HAM10000_metadata.csv line 6: field 'image_id': duplicate 'ISIC_0025030' (first on line 3)"
    )


def test_lesion_with_two_diagnoses(tmp_path: Path) -> None:
    rows = [ROWS[0], ROWS[1].replace(",bkl,", ",mel,"), *ROWS[2:]]
    message = error_of(write_tree(FileStore(tmp_path), csv_of(rows=rows)))
    assert message == (
        "HAM10000_metadata.csv line 3: field 'dx': lesion 'HAM_0000118' is 'mel' here "
        "but 'bkl' on line 2"
    )


def test_missing_image(tmp_path: Path) -> None:
    present = [r.split(",")[1] for r in ROWS if "ISIC_0026769" not in r]
    message = error_of(write_tree(FileStore(tmp_path), csv_of(), present))
    assert message.startswith(
        "HAM10000_metadata.csv line 4: field 'image_id': image 'ISIC_0026769' not found in "
        "HAM10000_images_part_1/ or HAM10000_images_part_2/"
    )


def test_missing_images_are_not_checked_without_images(tmp_path: Path) -> None:
    store = write_tree(FileStore(tmp_path), csv_of(), images=[])
    assert len(ham10000.load(store, with_images=False).metadata) == 4


def test_wrong_field_count(tmp_path: Path) -> None:
    rows = [ROWS[0], "HAM_1,ISIC_1,nv", *ROWS[2:]]
    message = error_of(write_tree(FileStore(tmp_path), csv_of(rows=rows)))
    assert message == "HAM10000_metadata.csv line 3: expected 7 fields, got 3"


@pytest.mark.parametrize(
    ("row", "field"),
    [
        (",ISIC_0000001,nv,histo,40.0,male,back", "lesion_id"),
        ("HAM_1,../etc/passwd,nv,histo,40.0,male,back", "image_id"),
        ("HAM_1,ISIC_0000001,,histo,40.0,male,back", "dx"),
    ],
)
def test_empty_or_unsafe_values(tmp_path: Path, row: str, field: str) -> None:
    message = error_of(write_tree(FileStore(tmp_path), csv_of(rows=[*ROWS, row])))
    assert message.startswith(f"HAM10000_metadata.csv line 6: field '{field}': ")


def test_missing_metadata_and_empty_files(tmp_path: Path) -> None:
    assert "HAM10000_metadata.csv: not found in" in error_of(FileStore(tmp_path / "none"))
    assert (
        error_of(write_tree(FileStore(tmp_path / "a"), "")) == "HAM10000_metadata.csv: empty file"
    )
    only_header = write_tree(FileStore(tmp_path / "b"), HEADER + "\n")
    assert error_of(only_header) == "HAM10000_metadata.csv: no rows after the header"


def test_upper_case_and_jpeg_suffixes_are_found(tmp_path: Path) -> None:
    store = write_tree(FileStore(tmp_path), csv_of(), images=[])
    for i, row in enumerate(ROWS):
        image_id = row.split(",")[1]
        suffix = (".jpg", ".JPG", ".jpeg", ".JPEG")[i]
        store.put_bytes(f"{ham10000.PARTS[i % 2]}/{image_id}{suffix}", jpeg())
    store.put_bytes(f"{ham10000.PARTS[0]}/notes.txt", b"not an image")
    keys = ham10000.load(store).metadata["key"]
    assert [k.rsplit(".", 1)[-1] for k in keys] == ["jpg", "JPG", "jpeg", "JPEG"]


class CountingStore:
    """Delegates to a store and counts the calls per method."""

    def __init__(self, inner: Store) -> None:
        self.inner, self.uri = inner, inner.uri
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            return method(*args, **kwargs)

        return counted

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        self.calls["list"] = self.calls.get("list", 0) + 1
        return self.inner.list(prefix)


def test_images_are_located_by_one_listing_per_part(tree: Store) -> None:
    spy = CountingStore(tree)
    ham10000.load(spy)  # type: ignore[arg-type]
    assert spy.calls["list"] == 2
    assert spy.calls.get("get_bytes") == 1  # the metadata only; no image is read
    assert spy.calls.get("exists", 0) <= 2  # metadata + synthetic marker, not one per image


def test_synthetic_marker(tree: Store) -> None:
    assert ham10000.load(tree).synthetic is False
    tree.put_bytes(ham10000.SYNTHETIC_MARKER, b"{}")
    assert ham10000.load(tree).synthetic is True


def test_raw_fingerprint_follows_the_content(tree: Store) -> None:
    first = ham10000.raw_fingerprint(tree)
    assert first == ham10000.raw_fingerprint(tree)
    tree.put_bytes(f"{ham10000.PARTS[1]}/ISIC_0031633.jpg", jpeg((64, 48)))  # other size
    second = ham10000.raw_fingerprint(tree)
    assert second != first
    tree.put_bytes(ham10000.METADATA, csv_of(rows=ROWS[:3]).encode())
    third = ham10000.raw_fingerprint(tree)
    assert third != second
    tree.put_bytes(ham10000.SYNTHETIC_MARKER, b"{}")
    assert ham10000.raw_fingerprint(tree) != third


def test_raw_fingerprint_of_a_missing_tree(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"HAM10000_metadata\.csv: not found"):
        ham10000.raw_fingerprint(FileStore(tmp_path))
