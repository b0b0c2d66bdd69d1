"""storage/indexer.py converts a header's raw elements itself (pydicom's `convert_value`,
the character set read once) instead of through item access: the record it makes must be
the one item access gives, for every header the archive accepts. Checked on pydicom's own
test files (every transfer syntax, its character set files, private tags, sequences), on
variants made here (implicit VR, other character sets, multi-values, an ambiguous VR) and
on the SIIM sample where it is present."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_charset_files, get_testdata_files
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from node.testing.samples import siim_dir, siim_missing_reason, small_image
from storage import indexer
from storage.errors import StoreError
from storage.indexer import HeaderRecord
from storage.intake import inspect_instance

TEST_FILES = sorted(
    {Path(p) for p in get_testdata_files("*.dcm") + get_charset_files("*.dcm")},
    key=lambda p: p.name,
)


def _by_item_access(ds: Dataset):
    """The walk the indexer made before: every element through `ds[tag]`."""
    for element in ds:
        yield int(element.tag), str(element.VR), element.value


def _both_records(data: bytes, monkeypatch) -> tuple[HeaderRecord, HeaderRecord]:
    try:
        fast = HeaderRecord.from_dataset(inspect_instance(data), "1.2")
    except StoreError:
        pytest.skip("the archive refuses this file")
    with monkeypatch.context() as patched:
        patched.setattr(indexer, "_top_level", _by_item_access)
        reference = HeaderRecord.from_dataset(inspect_instance(data), "1.2")
    return fast, reference


def _file_bytes(ds: Dataset, syntax=ExplicitVRLittleEndian) -> bytes:
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True, implicit_vr=syntax == ImplicitVRLittleEndian)
    return buffer.getvalue()


@pytest.mark.parametrize("path", TEST_FILES, ids=lambda p: p.name)
def test_pydicom_test_files_index_as_item_access_reads_them(path: Path, monkeypatch) -> None:
    data = path.read_bytes()
    try:
        dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID  # noqa: B018
    except Exception:
        pytest.skip("not a whole DICOM file")
    fast, reference = _both_records(data, monkeypatch)
    assert fast == reference


def _variant(charset: str | list[str] | None, name: str, syntax) -> bytes:
    ds = small_image(rows=8, columns=8)
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.PatientName = name
    ds.StudyDescription = name.replace("^", " ")
    ds.InstitutionName = name.replace("^", " ")
    ds.ImageType = ["ORIGINAL", "PRIMARY", " AXIAL "]
    ds.PixelSpacing = ["0.139000", "0.1390"]
    ds.SeriesNumber = " 12"
    ds.SmallestImagePixelValue = 0  # "US or SS": decided by Pixel Representation
    ds.add_new(0x00091010, "LO", "private value")
    ds.add_new(0x00090010, "LO", "PRIVATE CREATOR")
    ds.ReferencedImageSequence = [Dataset()]
    ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID = generate_uid()
    return _file_bytes(ds, syntax)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize(
    ("charset", "name"),
    [
        (None, "DOE^JOHN"),
        ("ISO_IR 100", "Müller^Jürgen"),
        ("ISO_IR 192", "Wang^XiaoDong=王^小東"),
        (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎"),
        ("ISO_IR 144", "Люкceмбypг"),
        ("GB18030", "Wang^XiaoDong=王^小东"),
    ],
    ids=["ascii", "latin1", "utf8", "iso2022-jp", "cyrillic", "gb18030"],
)
def test_variants_index_as_item_access_reads_them(charset, name, syntax, monkeypatch) -> None:
    fast, reference = _both_records(_variant(charset, name, syntax), monkeypatch)
    assert fast == reference
    assert fast.attributes  # the private and other attributes were indexed


def test_the_siim_sample_indexes_as_item_access_reads_it(monkeypatch) -> None:
    reason = siim_missing_reason()
    if reason:
        pytest.skip(reason)
    files = sorted(siim_dir().rglob("*.dcm"))
    assert files
    for path in files:
        fast, reference = _both_records(path.read_bytes(), monkeypatch)
        assert fast == reference, path.name
