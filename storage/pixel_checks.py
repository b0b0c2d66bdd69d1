"""Is the pixel data what the header and the transfer syntax say it is?

Checked on the encoded bytes, without decoding (PS3.5 8.2 and annex A.4):
- native Pixel Data has the length Rows x Columns x Samples per Pixel x Bits Allocated x
  Number of Frames imply, padded to even length;
- encapsulated Pixel Data has its offset table item and at least one fragment per frame;
- each frame starts and ends with its codec's markers: JPEG, JPEG-LS (SOI ... EOI), JPEG
  2000 and HTJ2K (SOC SIZ ... EOC, or a JP2 file), RLE (a consistent segment header).
`decode_every_frame` is the optional full check (storage.verify_pixels): every frame through
pydicom's pixel handlers.
"""

from __future__ import annotations

import io
import struct

from pydicom.dataset import Dataset
from pydicom.pixels import iter_pixels
from pydicom.uid import UID

from storage.errors import (
    PixelDataDecodeError,
    PixelDataEncapsulationError,
    PixelDataFrameError,
    PixelDataLengthError,
)
from storage.structure import DatasetStructure, PixelDataLayout

JPEG_SOI = b"\xff\xd8"
JPEG_EOI = b"\xff\xd9"
J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
# Trailing bytes a writer may leave after a codestream's end marker: the one byte that
# pads a fragment to even length, or a few fill bytes some encoders add.
MAX_TRAILING_PADDING = 8
BITS_FOR_TAG = {0x7FE00008: 32, 0x7FE00009: 64}  # Float and Double Float Pixel Data


def _int(header: Dataset, keyword: str, default: int | None = None, positive=False) -> int:
    value = header.get(keyword)
    if value is None or value == "":
        if default is None:
            raise PixelDataLengthError(f"Pixel Data without {keyword}")
        return default
    try:
        number = int(value)
    except (TypeError, ValueError) as exc:
        raise PixelDataLengthError(f"{keyword} {value!r} is not a number") from exc
    if number < 0 or (positive and number == 0):
        raise PixelDataLengthError(f"{keyword} is {number}")
    return number


def frame_count(header: Dataset) -> int:
    return max(_int(header, "NumberOfFrames", 1), 1)


def expected_native_length(header: Dataset, tag: int) -> int:
    """Bytes of native pixel data the Image Pixel attributes imply (without padding)."""
    rows = _int(header, "Rows", positive=True)
    columns = _int(header, "Columns", positive=True)
    samples = _int(header, "SamplesPerPixel", 1, positive=True)
    bits = BITS_FOR_TAG.get(tag) or _int(header, "BitsAllocated", positive=True)
    frames = frame_count(header)
    photometric = str(header.get("PhotometricInterpretation", "")).strip()
    if photometric in ("YBR_FULL_422", "YBR_PARTIAL_422") and samples == 3:
        # Two chroma samples are shared by each pair of pixels (PS3.3 C.7.6.3.1.2).
        per_frame_bits = rows * columns * 2 * bits
    else:
        per_frame_bits = rows * columns * samples * bits
    total_bits = per_frame_bits * frames
    return (total_bits + 7) // 8


def _check_native(header: Dataset, layout: PixelDataLayout) -> None:
    expected = expected_native_length(header, layout.tag)
    if layout.length < expected:
        raise PixelDataLengthError(
            f"Pixel Data has {layout.length} bytes; its header implies {expected}"
        )


def _frames(
    header: Dataset,
    layout: PixelDataLayout,
    data: memoryview,
    transfer_syntax: UID,
    has_extended_offset_table: bool,
) -> list[list[tuple[int, int]]]:
    """The fragments of each frame, as (offset, length) lists (PS3.5 A.4)."""
    fragments = list(layout.fragments)
    frames = frame_count(header)
    if len(fragments) < frames:
        raise PixelDataEncapsulationError(
            f"Pixel Data has {len(fragments)} fragments for {frames} frames"
        )
    if layout.offset_table[1] and layout.offset_table[1] != 4 * frames:
        raise PixelDataEncapsulationError(
            f"Basic Offset Table has {layout.offset_table[1] // 4} entries for {frames} frames"
        )
    if frames == 1:
        return [fragments]
    if len(fragments) == frames:
        return [[fragment] for fragment in fragments]
    if layout.offset_table[1]:
        return _frames_by_offset_table(layout, data, frames)
    if has_extended_offset_table:
        return [fragments]  # checked as one run of fragments: first start, last end
    starts = [
        i
        for i, (offset, _length) in enumerate(fragments)
        if _starts_frame(data, offset, transfer_syntax)
    ]
    if len(starts) != frames or starts[0] != 0:
        raise PixelDataEncapsulationError(
            f"Pixel Data fragments hold {len(starts)} frame starts for {frames} frames"
        )
    bounds = [*starts, len(fragments)]
    return [fragments[bounds[i] : bounds[i + 1]] for i in range(frames)]


def _frames_by_offset_table(
    layout: PixelDataLayout, data: memoryview, frames: int
) -> list[list[tuple[int, int]]]:
    table_offset = layout.offset_table[0]
    offsets = struct.unpack_from(f"<{frames}I", data, table_offset)
    first_item = layout.fragments[0][0] - 8
    by_position = {offset - 8 - first_item: i for i, (offset, _) in enumerate(layout.fragments)}
    indexes = [by_position.get(position) for position in offsets]
    if None in indexes or indexes != sorted(indexes) or indexes[0] != 0:
        raise PixelDataEncapsulationError("Basic Offset Table does not point at fragments")
    bounds = [*indexes, len(layout.fragments)]
    return [list(layout.fragments[bounds[i] : bounds[i + 1]]) for i in range(frames)]


def _family(transfer_syntax: UID) -> str:
    name = transfer_syntax.keyword
    if transfer_syntax == "1.2.840.10008.1.2.5":
        return "rle"
    if name.startswith(("JPEG2000", "HTJ2K")):
        return "j2k"
    if name.startswith("JPEG"):  # Baseline, Extended, Lossless and JPEG-LS
        return "jpeg"
    return "other"  # MPEG, HEVC and others: a stream, not frames with markers


def _starts_frame(data: memoryview, offset: int, transfer_syntax: UID) -> bool:
    head = bytes(data[offset : offset + 12])
    family = _family(transfer_syntax)
    if family == "jpeg":
        return head.startswith(JPEG_SOI)
    if family == "j2k":
        return head.startswith(J2K_SOC_SIZ) or head.startswith(JP2_SIGNATURE)
    return True


def _check_frame(
    number: int, fragments: list[tuple[int, int]], data: memoryview, transfer_syntax: UID
) -> None:
    family = _family(transfer_syntax)
    first_offset, first_length = fragments[0]
    last_offset, last_length = fragments[-1]
    head = bytes(data[first_offset : first_offset + min(first_length, 16)])
    tail = bytes(data[last_offset : last_offset + last_length])[-(MAX_TRAILING_PADDING + 2) :]
    if family == "jpeg":
        if not head.startswith(JPEG_SOI):
            raise PixelDataFrameError(f"frame {number} does not start with a JPEG SOI marker")
        if not _ends_with(tail, JPEG_EOI):
            raise PixelDataFrameError(f"frame {number} does not end with a JPEG EOI marker")
    elif family == "j2k":
        if not (head.startswith(J2K_SOC_SIZ) or head.startswith(JP2_SIGNATURE)):
            raise PixelDataFrameError(f"frame {number} does not start a JPEG 2000 codestream")
        if not _ends_with(tail, JPEG_EOI):  # EOC has the same code as JPEG's EOI
            raise PixelDataFrameError(f"frame {number} does not end with a JPEG 2000 EOC")
    elif family == "rle":
        _check_rle_header(number, fragments, data)


def _ends_with(tail: bytes, marker: bytes) -> bool:
    """True if `tail` ends with `marker`, after any padding (0x00, or 0xFF fill bytes)."""
    while tail and not tail.endswith(marker) and tail[-1] in (0x00, 0xFF):
        tail = tail[:-1]
    return tail.endswith(marker)


def _check_rle_header(number: int, fragments: list[tuple[int, int]], data: memoryview) -> None:
    """An RLE frame opens with 16 little-endian longs: segment count and offsets."""
    frame_length = sum(length for _, length in fragments)
    offset, length = fragments[0]
    if length < 64:
        raise PixelDataFrameError(f"frame {number} is shorter than an RLE header")
    count, *offsets = struct.unpack_from("<16I", data, offset)
    used = offsets[:count]
    if not 1 <= count <= 15 or used[0] != 64 or used != sorted(used) or used[-1] >= frame_length:
        raise PixelDataFrameError(f"frame {number} has an inconsistent RLE header")


def check_pixel_data(
    header: Dataset, structure: DatasetStructure, data: memoryview, transfer_syntax: UID
) -> None:
    """Raise a PixelDataError unless the pixel data fits the header and transfer syntax."""
    if structure.pixel_data_elements > 1:
        raise PixelDataEncapsulationError("the dataset holds more than one Pixel Data element")
    layout = structure.pixel_data
    if layout is None:
        return
    if not transfer_syntax.is_encapsulated:
        if layout.encapsulated:
            raise PixelDataEncapsulationError(
                "Pixel Data is encapsulated under a native transfer syntax"
            )
        _check_native(header, layout)
        return
    if not layout.encapsulated:
        if layout.tag == 0x7FE00010:
            raise PixelDataEncapsulationError(
                "Pixel Data is not encapsulated under a compressed transfer syntax"
            )
        return
    if not layout.fragments:
        raise PixelDataEncapsulationError("encapsulated Pixel Data has no fragment")
    if _family(transfer_syntax) == "other":
        return
    frames = _frames(header, layout, data, transfer_syntax, structure.has_extended_offset_table)
    for number, fragments in enumerate(frames, start=1):
        _check_frame(number, fragments, data, transfer_syntax)


def decode_every_frame(data: bytes | memoryview) -> None:
    """Decode each frame of a whole DICOM file with pydicom; raise PixelDataDecodeError."""
    number = 0
    try:
        for number, _frame in enumerate(iter_pixels(io.BytesIO(data)), start=1):  # noqa: B007
            pass
    except Exception as exc:
        raise PixelDataDecodeError(
            f"frame {number + 1} does not decode: {type(exc).__name__}: {exc}"
        ) from exc
