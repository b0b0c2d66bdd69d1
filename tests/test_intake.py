"""The intake checks without a network: the structure reader on hand-made element streams,
the pixel data checks on real and mangled images, the bounded inflate, the full decode."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from dicom_data import encode_body, file_bytes, write_raw_file
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
)

from node.testing.samples import small_image
from storage.errors import (
    DeflateError,
    EncodingMismatchError,
    PixelDataDecodeError,
    PixelDataEncapsulationError,
    PixelDataFrameError,
    PixelDataLengthError,
    TooLargeError,
    UnreadableDatasetError,
)
from storage.intake import MIB, IntakeChecks, inflate_bounded, inspect_instance
from storage.structure import MalformedDatasetError, file_meta_end, walk_dataset

# --- the structure reader ----------------------------------------------------------------


def explicit(tag: int, vr: bytes, value: bytes, *, undefined: bool = False) -> bytes:
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr
    if vr in (b"SQ", b"OB", b"OW", b"UN", b"UT"):
        return head + b"\0\0" + struct.pack("<I", 0xFFFFFFFF if undefined else len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def implicit(tag: int, value: bytes, *, undefined: bool = False) -> bytes:
    length = 0xFFFFFFFF if undefined else len(value)
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, length) + value


def item(content: bytes, *, undefined: bool = False) -> bytes:
    if undefined:
        return struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + content + ITEM_END
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(content)) + content


ITEM_END = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
SEQUENCE_END = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
MODALITY = explicit(0x00080060, b"CS", b"DX")
NAME = explicit(0x00100010, b"PN", b"A^B ")


def walk(body: bytes, implicit_vr: bool = False):
    return walk_dataset(body, implicit_vr=implicit_vr, little_endian=True)


def test_sequences_of_defined_and_undefined_length_nested() -> None:
    inner = explicit(0x00081115, b"SQ", item(NAME, undefined=True) + SEQUENCE_END, undefined=True)
    body = MODALITY + explicit(0x00081110, b"SQ", item(inner) + item(MODALITY)) + NAME
    assert walk(body).end == len(body)


def test_un_of_undefined_length_holds_implicit_vr_items() -> None:
    content = item(implicit(0x00100010, b"A^B "), undefined=True) + SEQUENCE_END
    body = MODALITY + explicit(0x00291010, b"UN", content, undefined=True)
    assert walk(body).end == len(body)


def test_implicit_vr_sequence_of_defined_length_is_walked_inside() -> None:
    good = implicit(0x00081110, item(implicit(0x00081150, b"1.2\0")))
    assert walk(good, implicit_vr=True).end == len(good)
    broken = implicit(0x00081110, struct.pack("<HHI", 0xFFFE, 0xE000, 100) + b"12345678")
    with pytest.raises(MalformedDatasetError, match="claims 100 bytes"):
        walk(broken, implicit_vr=True)


def test_private_implicit_element_is_not_taken_for_a_sequence() -> None:
    body = implicit(0x00291010, b"\x01\x02\x03\x04")
    assert walk(body, implicit_vr=True).end == len(body)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (MODALITY + NAME[:-2], "claims 4 bytes"),
        (MODALITY + NAME[:5], "cut at byte"),
        (explicit(0x00081110, b"SQ", item(NAME, undefined=True), undefined=True), "delimiter"),
        (explicit(0x00081110, b"SQ", item(NAME)[:-1] + b"  ", undefined=False), "cut|claims"),
        (explicit(0x00081110, b"SQ", MODALITY), "not an item"),
        (
            explicit(0x00100010, b"LO", b"AB", undefined=False)[:4] + b"\x0a\x00\x00\x00",
            "no valid VR",
        ),
        (explicit(0x00100010, b"LO", b"", undefined=False)[:4] + b"LO\xff\xff", "claims"),
        (ITEM_END, "outside an item"),
        (b"", "empty"),
    ],
    ids=[
        "cut-value",
        "cut-header",
        "no-item-delimiter",
        "item-too-long",
        "not-an-item",
        "bad-vr",
        "length-past-end",
        "stray-delimiter",
        "empty",
    ],
)
def test_malformed_structures_are_named(body: bytes, message: str) -> None:
    with pytest.raises(MalformedDatasetError, match=message):
        walk(body)


def test_nesting_deeper_than_the_limit_is_refused() -> None:
    content = NAME
    for _ in range(40):
        content = explicit(
            0x00081110, b"SQ", item(content, undefined=True) + SEQUENCE_END, undefined=True
        )
    with pytest.raises(MalformedDatasetError, match="nested deeper"):
        walk(content)


def test_file_meta_end_with_and_without_group_length() -> None:
    data = file_bytes(small_image())
    meta_end = file_meta_end(data)
    assert dcmread(io.BytesIO(data)).file_meta.FileMetaInformationGroupLength == meta_end - 144
    # The same file with its (0002,0000) element cut out: the end is found by walking.
    assert data[132:136] == b"\x02\x00\x00\x00"
    without = data[:132] + data[144:]
    assert file_meta_end(without) == meta_end - 12
    assert without[meta_end - 12 :] == data[meta_end:]


# --- whole instances -------------------------------------------------------------------------


def with_sequences(ds: Dataset) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ref.ReferencedSOPInstanceUID = "1.2.3.4"
    nested = Dataset()
    nested.ReferencedImageSequence = Sequence([ref])
    ds.ReferencedStudySequence = Sequence([nested, ref])
    ds.add_new(0x00090010, "LO", "PRIVATE")
    ds.add_new(0x00091001, "SQ", Sequence([ref]))
    return ds


@pytest.mark.parametrize(
    "syntax", [ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian]
)
def test_valid_variants_pass(syntax: str) -> None:
    ds = with_sequences(small_image())
    ds.file_meta.TransferSyntaxUID = syntax
    header = inspect_instance(file_bytes(ds))
    assert header.SOPInstanceUID == ds.SOPInstanceUID
    assert header.file_meta.TransferSyntaxUID == syntax
    assert len(header.ReferencedStudySequence) == 2


def test_multiframe_rle_monochrome1_and_palette_pass() -> None:
    ds = small_image()
    ds.NumberOfFrames = 3
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.PixelData = np.zeros((3, 32, 32), dtype=np.uint16).tobytes()
    assert inspect_instance(file_bytes(ds)).NumberOfFrames == 3
    ds.compress(RLELossless)
    assert inspect_instance(file_bytes(ds)).file_meta.TransferSyntaxUID == RLELossless
    palette = small_image()
    palette.PhotometricInterpretation = "PALETTE COLOR"
    palette.BitsAllocated = palette.BitsStored = 8
    palette.HighBit = 7
    palette.PixelData = bytes(32 * 32)
    for colour in ("Red", "Green", "Blue"):
        setattr(palette, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 8])
        setattr(palette, f"{colour}PaletteColorLookupTableData", bytes(range(256)))
    assert inspect_instance(file_bytes(palette)).PhotometricInterpretation == "PALETTE COLOR"


def test_implicit_bytes_under_explicit_syntax_is_an_encoding_mismatch() -> None:
    ds = small_image()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    data = bytearray(file_bytes(ds))
    meta_end = file_meta_end(data)
    explicit_file = file_bytes(small_image())  # one image: its UIDs' lengths vary
    explicit_meta = explicit_file[: file_meta_end(explicit_file)]
    lying = explicit_meta + bytes(data[meta_end:])
    with pytest.raises(EncodingMismatchError, match="encoded Implicit VR"):
        inspect_instance(lying)


def test_native_pixel_data_too_short() -> None:
    ds = small_image(rows=512, columns=512)
    ds.PixelData = b"\0" * 1000
    with pytest.raises(PixelDataLengthError, match="1000 bytes; its header implies 524288"):
        inspect_instance(file_bytes(ds))


def test_native_pixel_data_padded_by_one_byte_passes() -> None:
    ds = small_image(rows=3, columns=3)
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = bytes(9) + b"\0"
    inspect_instance(file_bytes(ds))


def jpeg_image(frames: list[bytes], *, offset_table: bool = False) -> Dataset:
    ds = small_image()
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.NumberOfFrames = len(frames)
    ds.PixelData = encapsulate(frames, has_bot=offset_table)
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    return ds


def siim_frame(siim_dicom_files: list[Path]) -> bytes:
    from pydicom.encaps import generate_frames

    ds = dcmread(siim_dicom_files[0])
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def test_jpeg_frames_checked_for_markers(siim_dicom_files) -> None:
    frame = siim_frame(siim_dicom_files)
    inspect_instance(file_bytes(jpeg_image([frame, frame], offset_table=True)))
    cut = frame[: len(frame) // 3]
    with pytest.raises(PixelDataFrameError, match="frame 1 does not end with a JPEG EOI"):
        inspect_instance(file_bytes(jpeg_image([cut + b"\0" * (len(cut) % 2)])))
    with pytest.raises(PixelDataFrameError, match="frame 2 does not start"):
        inspect_instance(file_bytes(jpeg_image([frame, b"\0\0" + frame[2:]])))


def test_fewer_fragments_than_frames(siim_dicom_files) -> None:
    ds = jpeg_image([siim_frame(siim_dicom_files)])
    ds.NumberOfFrames = 2
    with pytest.raises(PixelDataEncapsulationError, match="1 fragments for 2 frames"):
        inspect_instance(file_bytes(ds))


def test_native_pixel_data_under_a_jpeg_syntax(tmp_path: Path) -> None:
    ds = small_image()
    path = write_raw_file(
        tmp_path / "x.dcm",
        encode_body(ds),
        sop_class=ds.SOPClassUID,
        sop_instance=ds.SOPInstanceUID,
        transfer_syntax=JPEGBaseline8Bit,
    )
    with pytest.raises(PixelDataEncapsulationError, match="not encapsulated"):
        inspect_instance(path.read_bytes())


def test_verify_pixels_decodes_every_frame(siim_dicom_files) -> None:
    frame = siim_frame(siim_dicom_files)
    # Markers intact, entropy-coded data replaced: only a decode can tell.
    end = frame.rindex(b"\xff\xd9")
    garbled = frame[:700] + bytes(end - 700) + frame[end:]
    data = file_bytes(jpeg_image([garbled]))
    inspect_instance(data)
    with pytest.raises(PixelDataDecodeError, match="frame 1 does not decode"):
        inspect_instance(data, IntakeChecks(verify_pixels=True))


def test_size_limit_and_bounded_inflate() -> None:
    ds = small_image(rows=1024, columns=1024)  # 2 MiB of pixels
    with pytest.raises(TooLargeError, match="exceeds 1 MiB"):
        inspect_instance(file_bytes(ds), IntakeChecks(max_instance_bytes=MIB))
    bomb = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = bomb.compress(bytes(64 * MIB)) + bomb.flush()
    assert len(deflated) < MIB // 8
    with pytest.raises(TooLargeError, match="inflates past 4 MiB"):
        inflate_bounded(deflated, 4 * MIB)
    with pytest.raises(DeflateError, match="cut"):
        inflate_bounded(deflated[: len(deflated) // 2], 128 * MIB)


def test_garbage_after_the_file_meta() -> None:
    data = file_bytes(small_image())
    garbage = data[: file_meta_end(data)] + b"\x08\x00\x18\x00UI\xff\x7f" + b"garbage!" * 10
    with pytest.raises(UnreadableDatasetError, match="cannot parse"):
        inspect_instance(garbage)
