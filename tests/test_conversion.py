"""Transfer syntax conversion (storage.conversion) and the contexts and choices of the one
send path (node.dicom.send_instances), in one process on SIIM and pydicom's own test files."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from pydicom import dcmread, dcmwrite
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.pixels import pixel_array
from pydicom.uid import (
    MPEG2MPML,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
)
from pynetdicom.presentation import PresentationContext

from node.dicom.send_instances import Outgoing, prepare, requested_contexts
from storage import conversion
from storage.conversion import ConversionError, choose_syntax, convert, encode_converted

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
    # Decoded by Pillow: exactly its values, within 1 of pydicom's default (pylibjpeg),
    # as two conformant decoders of a lossy JPEG may be.
    assert np.array_equal(converted.pixel_array, pixel_array(original, decoding_plugin="pillow"))
    difference = converted.pixel_array.astype(int) - original.pixel_array.astype(int)
    assert np.abs(difference).max() <= 1


@pytest.mark.parametrize(
    ("name", "syntax"),
    [
        ("MR_small_RLE.dcm", RLELossless),
        ("SC_rgb_rle.dcm", RLELossless),
        ("image_dfl.dcm", DeflatedExplicitVRLittleEndian),
        ("MR_small_jp2klossless.dcm", JPEG2000Lossless),
        ("MR_small_jpeg_ls_lossless.dcm", JPEGLSLossless),
    ],
)
def test_lossless_syntaxes_convert_bit_exact(name: str, syntax: str) -> None:
    path = get_testdata_file(name)
    assert dcmread(path).file_meta.TransferSyntaxUID == syntax

    converted = _written_and_read(convert(dcmread(path), ImplicitVRLittleEndian))

    assert converted.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert np.array_equal(converted.pixel_array, dcmread(path).pixel_array)


@pytest.mark.parametrize(
    ("name", "tolerance"),
    [("SC_rgb_jpeg_dcmtk.dcm", 1), ("SC_rgb_dcmtk_+eb+cy+np.dcm", 0)],
)
def test_colour_jpeg_converts_to_rgb(name: str, tolerance: int) -> None:
    """YBR JPEG goes out as RGB, the colour conversion done by the decoder; subsampled
    chroma keeps pydicom's own decoder (Pillow's upsampling differs by up to 2)."""
    path = get_testdata_file(name)
    original = dcmread(path)
    assert original.PhotometricInterpretation.startswith("YBR")

    converted = _written_and_read(convert(dcmread(path), ExplicitVRLittleEndian))

    assert converted.PhotometricInterpretation == "RGB"
    difference = converted.pixel_array.astype(int) - original.pixel_array.astype(int)
    assert np.abs(difference).max() <= tolerance


def test_a_plugin_that_refuses_falls_back_to_pydicoms_choice(
    siim_dicom_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(conversion.DECODERS, JPEGBaseline8Bit, ("no-such-plugin", "pillow"))
    original = dcmread(siim_dicom_files[0])
    broken_first = dcmread(siim_dicom_files[0])
    calls: list[str] = []
    decompress = type(broken_first).decompress

    def refusing(self, *args, decoding_plugin: str = "", **kwargs) -> None:
        calls.append(decoding_plugin)
        if decoding_plugin == "pillow":
            raise RuntimeError("refused")
        decompress(self, *args, decoding_plugin=decoding_plugin, **kwargs)

    monkeypatch.setattr(type(broken_first), "decompress", refusing)
    converted = _written_and_read(convert(broken_first, ExplicitVRLittleEndian))

    assert calls == ["pillow", ""]
    assert np.array_equal(converted.pixel_array, original.pixel_array)


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
    assert dcmread(BytesIO(converted.content)).file_meta.TransferSyntaxUID == (
        ImplicitVRLittleEndian
    )
    assert converted.payload.content == converted.content
    assert converted.describe().startswith(" as Implicit VR Little Endian, converted from JPEG")
    assert ready(_accepted(CTImageStorage, JPEGBaseline8Bit)).refusal == (
        "DEST took no context for Secondary Capture Image Storage"
    )
    reverse_role = ready(_accepted(SecondaryCaptureImageStorage, JPEGBaseline8Bit, False))
    assert reverse_role.content is None and reverse_role.payload is None
    gone = _row(sop, SecondaryCaptureImageStorage, JPEGBaseline8Bit, "gone.dcm")
    missing = prepare(
        archive, gone, [_accepted(SecondaryCaptureImageStorage, JPEGBaseline8Bit)], "X"
    )
    assert missing.refusal == "stored file unreadable: FileNotFoundError"


@pytest.mark.parametrize("target", NATIVE)
@pytest.mark.parametrize(
    "name",
    [
        None,  # a SIIM JPEG
        "CT_small.dcm",
        "MR_small_RLE.dcm",
        "SC_rgb_rle.dcm",
        "MR_small_jp2klossless.dcm",
        "image_dfl.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",
    ],
)
def test_the_converted_bytes_are_pydicoms_writers(
    siim_dicom_files: list[Path], name: str | None, target: str
) -> None:
    """The pixel data appended after the rest (storage.conversion.encode_converted) gives
    byte for byte what pydicom's writer gives for the whole decoded dataset."""
    path = siim_dicom_files[0] if name is None else get_testdata_file(name)
    reference = dcmread(path)
    source = reference.file_meta.TransferSyntaxUID
    if source.is_encapsulated:
        conversion.decompress(reference, source)
    reference.file_meta.TransferSyntaxUID = target
    buffer = BytesIO()
    dcmwrite(
        buffer,
        reference,
        implicit_vr=target == ImplicitVRLittleEndian,
        little_endian=True,
        enforce_file_format=True,
    )

    assert encode_converted(dcmread(path), target) == buffer.getvalue()
