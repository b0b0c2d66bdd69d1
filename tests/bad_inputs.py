"""A corpus of bad C-STORE inputs: each case builds the bytes a broken or hostile sender
could put on the wire, and names the DIMSE status and ErrorComment the node must answer.

Bodies start from a valid dataset (`small_image`, a SIIM file) encoded with pydicom and are
then mangled with byte slicing and struct; the test writes them after a file meta and
sends them unchanged with `chunked_sending`. Builders run when their test runs (the zip
bomb and the oversize image are not built at collection). A case registers itself with
`@case(status, *comment)`, the texts its ErrorComment must hold; its id is the builder's
name.
"""

from __future__ import annotations

import copy
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from dicom_data import encode_body
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from support import siim_files

from node.testing.samples import DX, small_image

# Statuses (node/dicom/storage_scp.py): the test spells out the codes it expects.
UNREADABLE = 0xC210
ENCODING_MISMATCH = 0xC212
BROKEN_DEFLATE = 0xC213
INVALID_UID = 0xC220
TOO_LARGE = 0xA710
NOT_THE_SOP_CLASS = 0xA900
PIXEL_LENGTH = 0xC230
PIXEL_ENCAPSULATION = 0xC231
PIXEL_FRAME = 0xC232
STUDY_OF_ANOTHER_PATIENT = 0xC240
SERIES_OF_ANOTHER_STUDY = 0xC241

# Names a path-traversal UID would create if it ever reached the file system.
ESCAPE_MARKER = "pneumonode-escaped"

PATIENT_ID = 0x00100020
PATIENT_NAME = 0x00100010
REFERENCED_IMAGE_SEQUENCE = 0x00081140
REFERENCED_SOP_INSTANCE = b"\x08\x00\x55\x11"
ITEM_DELIMITER = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
PIXEL_DATA_UNDEFINED = b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff"
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT"}
# Markers only: the checks look at a frame's first and last bytes, never decode it.
FAKE_JPEG_FRAME = b"\xff\xd8\xff\xdb" + bytes(8) + b"\xff\xd9"


@dataclass(frozen=True)
class Payload:
    """What one case sends: the dataset bytes and the envelope they go in."""

    body: bytes
    sop_class: str
    sop_instance: str  # the request's Affected SOP Instance UID (and the file meta's)
    transfer_syntax: str = ExplicitVRLittleEndian
    absent: tuple[str, ...] = ()  # more UIDs that must leave no file and no index row
    prior: tuple[Dataset, ...] = ()  # valid instances stored first; they must stay as they are
    comment_has: tuple[str, ...] = ()  # more text the ErrorComment must hold
    comment_lacks: tuple[str, ...] = ()  # text it must not hold (identifiers)


@dataclass(frozen=True)
class Case:
    name: str
    status: int
    comment: tuple[str, ...]  # each must be in the ErrorComment (an LO: 64 characters)
    build: Callable[[], Payload]


CASES: list[Case] = []


def case(status: int, *comment: str) -> Callable[[Callable[[], Payload]], Callable[[], Payload]]:
    def register(build: Callable[[], Payload]) -> Callable[[], Payload]:
        CASES.append(Case(build.__name__, status, comment, build))
        return build

    return register


# --- building blocks -----------------------------------------------------------------------


def _payload(ds: Dataset, body: bytes | None = None, **envelope) -> Payload:
    """`body` (default: `ds` in Explicit VR LE) in the envelope `ds` announces."""
    if "sop_class" not in envelope:
        envelope["sop_class"] = str(ds.SOPClassUID)
    if "sop_instance" not in envelope:
        envelope["sop_instance"] = str(ds.SOPInstanceUID)
    return Payload(encode_body(ds) if body is None else body, **envelope)


def _implicit(ds: Dataset) -> bytes:
    return encode_body(ds, implicit_vr=True)


def _deflate(data: bytes) -> bytes:
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return deflater.compress(data) + deflater.flush()


def _offset_of(body: bytes, tag: int) -> int:
    """Where top-level element `tag` starts in an Explicit VR LE body of defined lengths."""
    offset = 0
    while offset < len(body):
        group, element = struct.unpack_from("<HH", body, offset)
        if (group << 16) | element == tag:
            return offset
        if bytes(body[offset + 4 : offset + 6]) in LONG_VRS:
            offset += 12 + struct.unpack_from("<I", body, offset + 8)[0]
        else:
            offset += 8 + struct.unpack_from("<H", body, offset + 6)[0]
    raise KeyError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) not in the body")


def _item(value: bytes) -> bytes:
    """An item of defined length, padded to even length (encapsulated fragments)."""
    if len(value) % 2:
        value += b"\x00"
    return b"\xfe\xff\x00\xe0" + struct.pack("<I", len(value)) + value


def _encapsulated(ds: Dataset, fragments: list[bytes], offset_table: bytes = b"") -> bytes:
    """`ds` with its Pixel Data replaced by `fragments`, encapsulated (PS3.5 A.4)."""
    header = copy.deepcopy(ds)
    del header.PixelData
    items = b"".join(_item(f) for f in fragments)
    pixel_data = PIXEL_DATA_UNDEFINED + _item(offset_table) + items + SEQUENCE_DELIMITER
    return encode_body(header) + pixel_data


def _with_undefined_sequence(ds: Dataset) -> bytes:
    """`ds` with a Referenced Image Sequence of undefined length, one item of undefined
    length: both end with their delimiters."""
    item = Dataset()
    item.ReferencedSOPClassUID = DX
    item.ReferencedSOPInstanceUID = generate_uid()
    item.is_undefined_length_sequence_item = True
    ds.ReferencedImageSequence = [item]
    ds["ReferencedImageSequence"].is_undefined_length = True
    return encode_body(ds)


def _only_frame(ds: Dataset) -> bytes:
    return next(generate_frames(ds.PixelData, number_of_frames=1))


# --- 0xC210: the bytes do not parse as a dataset --------------------------------------------


@case(UNREADABLE, "cannot parse")
def garbage_bytes() -> Payload:
    ds = small_image()
    junk = bytes((i * 131 + 7) % 251 for i in range(600))
    return _payload(ds, junk)


@case(UNREADABLE, "the dataset is empty")
def empty_dataset() -> Payload:
    return _payload(small_image(), b"")


@case(UNREADABLE, "(0009,1001) cut at byte 18")
def cut_inside_a_long_vr_header() -> Payload:
    # pynetdicom's chunked sender must read the first element's header whole to find the
    # dataset's start: a Specific Character Set, then 10 of the 12 bytes of an OB header.
    ds = small_image()
    first = encode_body(ds)[:18]
    return _payload(ds, first + b"\x09\x00\x01\x10OB\x00\x00\x10\x00")


@case(UNREADABLE, "element header cut")
def cut_mid_element_header() -> Payload:
    ds = small_image()
    body = encode_body(ds)
    return _payload(ds, body[: _offset_of(body, PATIENT_ID) + 5])


@case(UNREADABLE, "(0010,0010)")
def cut_mid_value() -> Payload:
    ds = small_image()
    body = encode_body(ds)
    return _payload(ds, body[: _offset_of(body, PATIENT_NAME) + 8 + 4])


@case(UNREADABLE, "(0008,1155)")
def cut_inside_sequence_item() -> Payload:
    ds = small_image()
    body = _with_undefined_sequence(ds)
    start = body.index(REFERENCED_SOP_INSTANCE, _offset_of(body, REFERENCED_IMAGE_SEQUENCE))
    return _payload(ds, body[: start + 8 + 10])


@case(UNREADABLE, "(7FE0,0010)")
def cut_inside_pixel_data() -> Payload:
    ds = small_image()
    return _payload(ds, encode_body(ds)[:-100])


@case(UNREADABLE, "holds (0010,0010)")
def sequence_without_delimiter() -> Payload:
    ds = small_image()
    body = _with_undefined_sequence(ds)
    return _payload(ds, body.replace(SEQUENCE_DELIMITER, b"", 1))


@case(UNREADABLE, "without delimiter")
def last_sequence_without_delimiter() -> Payload:
    ds = small_image()
    item = Dataset()
    item.MACIDNumber = 1
    ds.DigitalSignaturesSequence = [item]  # (FFFA,FFFA): after the Pixel Data, the last
    ds["DigitalSignaturesSequence"].is_undefined_length = True
    body = encode_body(ds)
    assert body.endswith(SEQUENCE_DELIMITER)
    return _payload(ds, body[: -len(SEQUENCE_DELIMITER)])


@case(UNREADABLE, "item tag (FFFE,E0DD) among elements")
def item_without_delimiter() -> Payload:
    ds = small_image()
    body = _with_undefined_sequence(ds)
    return _payload(ds, body.replace(ITEM_DELIMITER, b"", 1))


@case(UNREADABLE, "item tag (FFFE,E000) among elements")
def item_tag_at_top_level() -> Payload:
    ds = small_image()
    body = encode_body(ds)
    at = _offset_of(body, PATIENT_ID)
    return _payload(ds, body[:at] + _item(b"") + body[at:])


@case(UNREADABLE, "(0010,0020) claims 65535 bytes")
def length_past_the_end() -> Payload:
    ds = small_image()
    body = bytearray(encode_body(ds))
    struct.pack_into("<H", body, _offset_of(body, PATIENT_ID) + 6, 0xFFFF)
    return _payload(ds, bytes(body))


@case(UNREADABLE, "(0009,1001) of VR OB has undefined length")
def undefined_length_outside_pixel_data() -> Payload:
    ds = small_image()
    body = encode_body(ds)
    at = _offset_of(body, PATIENT_NAME)
    private = b"\x09\x00\x01\x10OB\x00\x00\xff\xff\xff\xff" + bytes(8)
    return _payload(ds, body[:at] + private + body[at:])


@case(UNREADABLE, "(0010,0020) has no valid VR")
def invalid_vr() -> Payload:
    ds = small_image()
    body = bytearray(encode_body(ds))
    at = _offset_of(body, PATIENT_ID)
    body[at + 4 : at + 6] = b"\x00\x01"
    return _payload(ds, bytes(body))


@case(UNREADABLE, "nested deeper than 32")
def sequences_nested_33_deep() -> Payload:
    ds = small_image()
    inner = Dataset()
    inner.TextValue = "bottom"
    for _ in range(33):
        item = Dataset()
        item.ContentSequence = [inner]
        inner = item
    ds.ContentSequence = inner.ContentSequence
    return _payload(ds)


@case(UNREADABLE, "pixel data without offset table")
def encapsulated_without_items() -> Payload:
    ds = small_image()
    header = copy.deepcopy(ds)
    del header.PixelData
    body = encode_body(header) + PIXEL_DATA_UNDEFINED + SEQUENCE_DELIMITER
    return _payload(ds, body, transfer_syntax=JPEGBaseline8Bit)


@case(UNREADABLE, "cannot parse")
def little_endian_under_big_endian() -> Payload:
    ds = small_image(rows=64, columns=64)
    return _payload(ds, transfer_syntax=ExplicitVRBigEndian)


# --- 0xC212: parses, but in the other VR mode than its transfer syntax ----------------------


@case(ENCODING_MISMATCH, "encoded Implicit VR")
def implicit_vr_under_explicit() -> Payload:
    ds = small_image()
    return _payload(ds, _implicit(ds))


@case(ENCODING_MISMATCH, "encoded Explicit VR")
def explicit_vr_under_implicit() -> Payload:
    ds = small_image()
    return _payload(ds, transfer_syntax=ImplicitVRLittleEndian)


@case(ENCODING_MISMATCH, "encoded Implicit VR")
def deflated_implicit_vr() -> Payload:
    ds = small_image()
    stream = _deflate(_implicit(ds))
    return _payload(ds, stream, transfer_syntax=DeflatedExplicitVRLittleEndian)


# --- 0xC213: the deflate stream of a Deflated dataset is broken -----------------------------


@case(BROKEN_DEFLATE, "deflate stream is cut")
def deflate_stream_cut() -> Payload:
    ds = small_image()
    stream = _deflate(encode_body(ds))
    return _payload(ds, stream[: len(stream) // 2], transfer_syntax=DeflatedExplicitVRLittleEndian)


@case(BROKEN_DEFLATE, "does not inflate")
def deflate_invalid_block_type() -> Payload:
    ds = small_image()
    stream = bytearray(_deflate(encode_body(ds)))
    stream[0] |= 0b110  # BTYPE 11: reserved (RFC 1951 3.2.3)
    return _payload(ds, bytes(stream), transfer_syntax=DeflatedExplicitVRLittleEndian)


@case(BROKEN_DEFLATE, "bytes follow the end of the deflate stream")
def deflate_then_garbage() -> Payload:
    ds = small_image()
    stream = _deflate(encode_body(ds)) + b"trailing garbage " * 4
    return _payload(ds, stream, transfer_syntax=DeflatedExplicitVRLittleEndian)


@case(BROKEN_DEFLATE, "does not inflate")
def zlib_wrapped_deflate() -> Payload:
    """zlib's header and checksum around the stream: wbits 15 where DICOM wants raw."""
    ds = small_image()
    deflater = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS)
    stream = deflater.compress(encode_body(ds)) + deflater.flush()
    return _payload(ds, stream, transfer_syntax=DeflatedExplicitVRLittleEndian)


@case(BROKEN_DEFLATE, "does not inflate")
def plain_dataset_under_deflated() -> Payload:
    ds = small_image()
    return _payload(ds, transfer_syntax=DeflatedExplicitVRLittleEndian)


# --- 0xC220: a UID the archive needs is missing or invalid (never a path) -------------------


@case(INVALID_UID, "SOPInstanceUID is missing")
def missing_sop_instance_uid() -> Payload:
    ds = small_image()
    sop = ds.SOPInstanceUID
    del ds.SOPInstanceUID
    return _payload(ds, sop_instance=sop)


@case(INVALID_UID, "SOPClassUID is missing")
def missing_sop_class_uid() -> Payload:
    ds = small_image()
    del ds.SOPClassUID
    return _payload(ds, sop_class=DX)


@case(INVALID_UID, "StudyInstanceUID is missing")
def missing_study_uid() -> Payload:
    ds = small_image()
    del ds.StudyInstanceUID
    return _payload(ds)


@case(INVALID_UID, "StudyInstanceUID")
def study_uid_absolute_path() -> Payload:
    ds = small_image()
    ds.StudyInstanceUID = f"/tmp/{ESCAPE_MARKER}-study"
    return _payload(ds)


@case(INVALID_UID, "SeriesInstanceUID")
def series_uid_climbing_out() -> Payload:
    ds = small_image()
    ds.SeriesInstanceUID = f"../../../../{ESCAPE_MARKER}-series"
    return _payload(ds)


@case(INVALID_UID, "SOPInstanceUID")
def sop_uid_climbing_out() -> Payload:
    ds = small_image(sop_uid=f"../../../../../{ESCAPE_MARKER}-sop")
    return _payload(ds)


@case(INVALID_UID, "SeriesInstanceUID")
def series_uid_of_70_digits() -> Payload:
    ds = small_image(series_uid="1.2." + "3" * 66)
    return _payload(ds)


@case(INVALID_UID, "StudyInstanceUID")
def study_uid_with_two_values() -> Payload:
    ds = small_image()
    ds.StudyInstanceUID = [generate_uid(), generate_uid()]
    return _payload(ds)


# --- 0xA710: larger than storage.max_instance_mib (4 MiB in the test's node) ----------------


@case(TOO_LARGE, "exceeds 4 MiB")
def instance_over_the_limit() -> Payload:
    ds = small_image(rows=1600, columns=1600)  # 5,120,000 bytes of pixels
    return _payload(ds)


@case(TOO_LARGE, "inflates past")
def deflate_bomb() -> Payload:
    """A 32 KiB Deflated dataset: a valid image and a private OB of 32 MiB of zeros."""
    ds = small_image()
    ds.add_new(0x7FE10010, "LO", "PNEUMONODE TEST")
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros_length = 32 << 20
    header = b"\xe1\x7f\x00\x10OB\x00\x00" + struct.pack("<I", zeros_length)
    parts = [deflater.compress(encode_body(ds) + header)]
    parts += [deflater.compress(bytes(1 << 20)) for _ in range(zeros_length >> 20)]
    stream = b"".join(parts) + deflater.flush()
    assert len(stream) < 64 << 10
    return _payload(ds, stream, transfer_syntax=DeflatedExplicitVRLittleEndian)


# --- 0xA900: not the instance its context or request announces ------------------------------


@case(NOT_THE_SOP_CLASS, "presentation context")
def sop_class_not_the_context() -> Payload:
    ds = small_image(sop_class=CTImageStorage)
    return _payload(ds, sop_class=SecondaryCaptureImageStorage)


@case(NOT_THE_SOP_CLASS, "SOP Instance UID differs from the request")
def sop_instance_not_the_request() -> Payload:
    ds = small_image()
    return _payload(ds, sop_instance=generate_uid())


# --- 0xC230: native Pixel Data shorter than the header implies -----------------------------


@case(PIXEL_LENGTH, "Pixel Data has 1000 bytes; its header implies 524288")
def pixel_data_shorter_than_header() -> Payload:
    ds = small_image()
    ds.Rows = ds.Columns = 512
    ds.PixelData = bytes(1000)
    return _payload(ds)


@case(PIXEL_LENGTH, "its header implies 8192")
def frames_missing_from_pixel_data() -> Payload:
    ds = small_image()
    ds.NumberOfFrames = 4  # one 32 x 32 x 16-bit frame of 2048 bytes is there
    return _payload(ds)


@case(PIXEL_LENGTH, "NumberOfFrames is -1")
def negative_number_of_frames() -> Payload:
    ds = small_image()
    ds.NumberOfFrames = "-1"
    return _payload(ds)


@case(PIXEL_LENGTH, "Pixel Data without Rows")
def pixel_data_without_rows() -> Payload:
    ds = small_image()
    del ds.Rows
    return _payload(ds)


@case(PIXEL_LENGTH, "Rows is 0")
def rows_zero() -> Payload:
    ds = small_image()
    ds.Rows = 0
    return _payload(ds)


@case(PIXEL_LENGTH, "NumberOfFrames")
def number_of_frames_not_a_number() -> Payload:
    ds = small_image()
    body = encode_body(ds)
    at = _offset_of(body, 0x00280010)  # Rows: Number of Frames (0028,0008) goes before it
    return _payload(ds, body[:at] + b"\x28\x00\x08\x00IS\x04\x00abc " + body[at:])


# --- 0xC231: encapsulation against the transfer syntax or the frame count ------------------


@case(PIXEL_ENCAPSULATION, "encapsulated under a native transfer syntax")
def encapsulated_under_native() -> Payload:
    ds = small_image()
    return _payload(ds, _encapsulated(ds, [FAKE_JPEG_FRAME]))


@case(PIXEL_ENCAPSULATION, "not encapsulated under a compressed")
def native_under_jpeg() -> Payload:
    ds = small_image()
    return _payload(ds, transfer_syntax=JPEGBaseline8Bit)


@case(PIXEL_ENCAPSULATION, "has no fragment")
def encapsulated_without_fragment() -> Payload:
    ds = small_image()
    return _payload(ds, _encapsulated(ds, []), transfer_syntax=JPEGBaseline8Bit)


@case(PIXEL_ENCAPSULATION, "2 fragments for 3 frames")
def fewer_fragments_than_frames() -> Payload:
    ds = small_image()
    ds.NumberOfFrames = 3
    body = _encapsulated(ds, [FAKE_JPEG_FRAME] * 2)
    return _payload(ds, body, transfer_syntax=JPEGBaseline8Bit)


@case(PIXEL_ENCAPSULATION, "Basic Offset Table has 3 entries for 2 frames")
def offset_table_with_wrong_entries() -> Payload:
    ds = small_image()
    ds.NumberOfFrames = 2
    step = 8 + len(FAKE_JPEG_FRAME)
    table = struct.pack("<3I", 0, step, 2 * step)
    body = _encapsulated(ds, [FAKE_JPEG_FRAME] * 3, offset_table=table)
    return _payload(ds, body, transfer_syntax=JPEGBaseline8Bit)


@case(PIXEL_ENCAPSULATION, "Basic Offset Table has 3 entries for 2 frames")
def offset_table_longer_than_the_frames() -> Payload:
    ds = small_image()
    ds.NumberOfFrames = 2
    step = 8 + len(FAKE_JPEG_FRAME)
    table = struct.pack("<3I", 0, step, 2 * step)
    body = _encapsulated(ds, [FAKE_JPEG_FRAME] * 2, offset_table=table)
    return _payload(ds, body, transfer_syntax=JPEGBaseline8Bit)


@case(PIXEL_ENCAPSULATION, "more than one Pixel Data element")
def two_pixel_data_elements() -> Payload:
    ds = small_image()
    ds.FloatPixelData = bytes(32 * 32 * 4)
    return _payload(ds)


# --- 0xC232: a frame without its codec's markers --------------------------------------------


@case(PIXEL_FRAME, "does not end with a JPEG EOI marker")
def jpeg_frame_cut_to_a_third() -> Payload:
    """A real SIIM JPEG Baseline image whose frame lost its last two thirds; the item
    lengths agree with the bytes, so only the codec markers tell."""
    ds = dcmread(siim_files()[0])  # skips the test, with the reason, without the sample
    assert ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = generate_uid()
    frame = _only_frame(ds)
    body = _encapsulated(ds, [frame[: len(frame) // 3]])
    return _payload(ds, body, transfer_syntax=JPEGBaseline8Bit)


@case(PIXEL_FRAME, "does not start with a JPEG SOI marker")
def jpeg_frame_without_soi() -> Payload:
    ds = small_image()
    body = _encapsulated(ds, [b"\x00\x00" + FAKE_JPEG_FRAME[2:]])
    return _payload(ds, body, transfer_syntax=JPEGBaseline8Bit)


@case(PIXEL_FRAME, "does not start a JPEG 2000 codestream")
def j2k_frame_without_soc_siz() -> Payload:
    ds = small_image()
    ds.compress(JPEG2000Lossless)
    frame = _only_frame(ds)
    assert frame.startswith(b"\xff\x4f\xff\x51")
    body = _encapsulated(ds, [bytes(4) + frame[4:]])
    return _payload(ds, body, transfer_syntax=JPEG2000Lossless)


@case(PIXEL_FRAME, "inconsistent RLE header")
def rle_segment_header_nonsense() -> Payload:
    ds = small_image()
    ds.compress(RLELossless)
    frame = bytearray(_only_frame(ds))
    struct.pack_into("<2I", frame, 0, 99, 7)  # 99 segments, the first at byte 7
    body = _encapsulated(ds, [bytes(frame)])
    return _payload(ds, body, transfer_syntax=RLELossless)


# --- 0xC240/0xC241: a study or series the index holds under another parent ------------------


@case(STUDY_OF_ANOTHER_PATIENT)
def study_of_another_patient() -> Payload:
    first = small_image(patient_id="CONFLICT-PATIENT-A")
    second = small_image(patient_id="CONFLICT-PATIENT-B", study_uid=first.StudyInstanceUID)
    return _payload(
        second,
        prior=(first,),
        comment_has=(first.StudyInstanceUID,),
        comment_lacks=("CONFLICT-PATIENT-A", "CONFLICT-PATIENT-B"),
    )


@case(SERIES_OF_ANOTHER_STUDY)
def series_of_another_study() -> Payload:
    first = small_image(patient_id="CONFLICT-PATIENT-C")
    second = small_image(patient_id="CONFLICT-PATIENT-C", series_uid=first.SeriesInstanceUID)
    return _payload(
        second,
        prior=(first,),
        absent=(second.StudyInstanceUID,),
        comment_has=(first.SeriesInstanceUID,),
    )
