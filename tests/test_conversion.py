"""Transfer syntax conversion (storage.conversion) and the contexts and choices of the one
send path (node.dicom.send_instances), in one process on SIIM and pydicom's own test files."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import (
    MPEG2MPML,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    SecondaryCaptureImageStorage,
)
from pynetdicom.presentation import PresentationContext

from node.dicom.send_instances import Outgoing, prepare, requested_contexts
from storage.conversion import ConversionError, choose_syntax, convert

NATIVE = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


def _written_and_read(ds) -> object:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return dcmread(buffer)


@pytest.mark.parametrize("target", NATIVE)
def test_jpeg_baseline_decompresses_to_either_little_endian(
    siim_dicom_files: list[Path], target: str
) -> None:
    source = siim_dicom_files[0]
    original = dcmread(source)

    converted = _written_and_read(convert(dcmread(source), target))

    assert converted.file_meta.TransferSyntaxUID == target
    assert converted.SOPInstanceUID == original.SOPInstanceUID
    assert converted.PhotometricInterpretation == "MONOCHROME2"
    assert np.array_equal(converted.pixel_array, original.pixel_array)


@pytest.mark.parametrize(
    ("name", "syntax"),
    [("MR_small_RLE.dcm", RLELossless), ("image_dfl.dcm", DeflatedExplicitVRLittleEndian)],
)
def test_rle_and_deflated_convert(name: str, syntax: str) -> None:
    path = get_testdata_file(name)
    assert dcmread(path).file_meta.TransferSyntaxUID == syntax

    converted = _written_and_read(convert(dcmread(path), ImplicitVRLittleEndian))

    assert converted.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert np.array_equal(converted.pixel_array, dcmread(path).pixel_array)


def test_explicit_to_implicit_keeps_every_element() -> None:
    path = get_testdata_file("CT_small.dcm")
    original = dcmread(path)

    converted = _written_and_read(convert(dcmread(path), ImplicitVRLittleEndian))

    assert converted.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert [e.tag for e in converted] == [e.tag for e in original]
    assert converted.PatientName == original.PatientName
    assert np.array_equal(converted.pixel_array, original.pixel_array)


def test_what_cannot_be_converted_says_why(siim_dicom_files: list[Path]) -> None:
    big_endian = dcmread(get_testdata_file("CT_small.dcm"))
    big_endian.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    with pytest.raises(ConversionError, match="Big Endian"):
        convert(big_endian, ExplicitVRLittleEndian)

    broken = dcmread(siim_dicom_files[0])
    broken.PixelData = encapsulate([b"\xff\xd8\xff\xdb" + bytes(64) + b"\xff\xd9"])
    with pytest.raises(ConversionError, match="does not decode"):
        convert(broken, ExplicitVRLittleEndian)

    video = dcmread(siim_dicom_files[0])
    video.file_meta.TransferSyntaxUID = MPEG2MPML
    with pytest.raises(ConversionError, match="no decoder"):
        convert(video, ExplicitVRLittleEndian)

    with pytest.raises(ConversionError, match="cannot convert to"):
        convert(dcmread(siim_dicom_files[0]), RLELossless)


def test_the_stored_syntax_wins_then_explicit_then_implicit() -> None:
    assert choose_syntax(JPEGBaseline8Bit, [ExplicitVRLittleEndian, JPEGBaseline8Bit]) == (
        JPEGBaseline8Bit
    )
    assert choose_syntax(JPEGBaseline8Bit, NATIVE[::-1]) == ExplicitVRLittleEndian
    assert choose_syntax(JPEGBaseline8Bit, [ImplicitVRLittleEndian]) == ImplicitVRLittleEndian
    assert choose_syntax(ExplicitVRLittleEndian, [JPEGBaseline8Bit]) is None
    assert choose_syntax(ExplicitVRBigEndian, NATIVE) is None


def _row(sop: str, sop_class: str, syntax: str, path: str = "") -> SimpleNamespace:
    return SimpleNamespace(
        sop_instance_uid=sop, sop_class_uid=sop_class, transfer_syntax_uid=syntax, file_path=path
    )


def test_contexts_per_stored_syntax_plus_an_uncompressed_one_per_class() -> None:
    rows = [
        _row("1", SecondaryCaptureImageStorage, JPEGBaseline8Bit),
        _row("2", SecondaryCaptureImageStorage, JPEGBaseline8Bit),
        _row("3", SecondaryCaptureImageStorage, ExplicitVRLittleEndian),
        _row("4", CTImageStorage, ImplicitVRLittleEndian),
    ]

    proposed = [(cx.abstract_syntax, cx.transfer_syntax) for cx in requested_contexts(rows)]

    assert proposed == [
        (SecondaryCaptureImageStorage, NATIVE),
        (CTImageStorage, NATIVE),
        (SecondaryCaptureImageStorage, [JPEGBaseline8Bit]),
        (SecondaryCaptureImageStorage, [ExplicitVRLittleEndian]),
        (CTImageStorage, [ImplicitVRLittleEndian]),
    ]


def test_contexts_stop_at_128_keeping_one_uncompressed_per_class() -> None:
    classes = [f"1.2.826.0.1.3680043.8.498.7.{n}" for n in range(100)]
    rows = [_row(str(n), c, JPEGBaseline8Bit) for n, c in enumerate(classes)]

    contexts = requested_contexts(rows)

    assert len(contexts) == 128
    assert [cx.abstract_syntax for cx in contexts[:100]] == classes
    assert all(cx.transfer_syntax == NATIVE for cx in contexts[:100])


def _accepted(sop_class: str, syntax: str, as_scu: bool = True) -> PresentationContext:
    context = PresentationContext()
    context.abstract_syntax = sop_class
    context.transfer_syntax = [syntax]
    context._as_scu = as_scu
    return context


def test_prepare_sends_as_stored_converts_or_says_why(siim_dicom_files: list[Path]) -> None:
    folder = siim_dicom_files[0].parent
    archive = SimpleNamespace(path_of=lambda relative: folder / relative)
    sop = str(dcmread(siim_dicom_files[0], stop_before_pixels=True).SOPInstanceUID)
    row = _row(sop, SecondaryCaptureImageStorage, JPEGBaseline8Bit, siim_dicom_files[0].name)

    def ready(*accepted: PresentationContext) -> Outgoing:
        return prepare(archive, row, accepted, "DEST")

    as_stored = ready(_accepted(SecondaryCaptureImageStorage, JPEGBaseline8Bit))
    assert as_stored.syntax == JPEGBaseline8Bit and not as_stored.converted
    converted = ready(_accepted(SecondaryCaptureImageStorage, ImplicitVRLittleEndian))
    assert converted.converted
    assert converted.dataset.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert converted.describe().startswith(" as Implicit VR Little Endian, converted from JPEG")
    assert ready(_accepted(CTImageStorage, JPEGBaseline8Bit)).refusal == (
        "DEST took no context for Secondary Capture Image Storage"
    )
    reverse_role = ready(_accepted(SecondaryCaptureImageStorage, JPEGBaseline8Bit, False))
    assert reverse_role.dataset is None
    gone = _row(sop, SecondaryCaptureImageStorage, JPEGBaseline8Bit, "gone.dcm")
    missing = prepare(
        archive, gone, [_accepted(SecondaryCaptureImageStorage, JPEGBaseline8Bit)], "X"
    )
    assert missing.refusal == "stored file unreadable: FileNotFoundError"
