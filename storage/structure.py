"""A reader of DICOM element structure: does a dataset parse to its end, element by element?

pydicom reads a truncated or garbled dataset without complaint, keeping what it could, so
"can this be read back?" needs a reader that refuses instead. This one walks every element
of an encoded dataset in its own transfer syntax (implicit or explicit VR, little or big
endian): sequences and items of defined or undefined length, nested to any sane depth,
private tags, UN of undefined length (implicit VR inside, PS3.5 6.2.2), and encapsulated
Pixel Data. It decodes no values; it returns where the Pixel Data lies so that its length
and its fragments can be checked against the header. Only pydicom's public data dictionary
is used, to know which implicit-VR elements of defined length are sequences.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR

UNDEFINED_LENGTH = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel, Float, Double Float
EXTENDED_OFFSET_TABLE = 0x7FE00001
MAX_NESTING = 32  # deeper than any real object; a hostile one would exhaust the stack

# Explicit VR: these have two reserved bytes and a 4-byte length (PS3.5 7.1.2).
LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
SHORT_VRS = frozenset(
    {
        b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT",
        b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
    }
)  # fmt: skip


class MalformedDatasetError(ValueError):
    """The bytes do not parse to the end as a dataset in the given encoding."""


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


@dataclass(frozen=True)
class PixelDataLayout:
    """Where the top-level pixel data lies in the dataset bytes."""

    tag: int
    encapsulated: bool
    value_offset: int = 0  # native: where the value starts
    length: int = 0  # native: the value's length
    offset_table: tuple[int, int] = (0, 0)  # encapsulated: Basic Offset Table (offset, length)
    fragments: tuple[tuple[int, int], ...] = ()  # encapsulated: (offset, length) each


@dataclass
class DatasetStructure:
    """What the walk found: the end of the last element, and the top-level pixel data."""

    end: int = 0
    pixel_data: PixelDataLayout | None = None
    pixel_data_elements: int = 0  # how many of PIXEL_DATA_TAGS the top level holds
    has_extended_offset_table: bool = False
    elements: int = 0


class _Walker:
    def __init__(self, data: bytes | memoryview, implicit_vr: bool, little_endian: bool):
        self.data = memoryview(data).cast("B")
        self.implicit_vr = implicit_vr
        endian = "<" if little_endian else ">"
        self.tag_format = struct.Struct(endian + "HH")
        self.u16 = struct.Struct(endian + "H")
        self.u32 = struct.Struct(endian + "I")
        self.result = DatasetStructure()

    # --- primitives -----------------------------------------------------------------------

    def _need(self, offset: int, size: int, end: int, what: str) -> None:
        if offset + size > end:
            raise MalformedDatasetError(f"{what} cut at byte {offset}")

    def _tag(self, offset: int) -> int:
        group, element = self.tag_format.unpack_from(self.data, offset)
        return (group << 16) | element

    # --- datasets -------------------------------------------------------------------------

    def elements(
        self, offset: int, end: int, depth: int, implicit: bool, *, top: bool, until_delimiter
    ) -> int:
        """Walk elements from `offset` up to `end`, or up to an Item Delimitation Item
        when `until_delimiter` (an item of undefined length); returns where they end."""
        if depth > MAX_NESTING:
            raise MalformedDatasetError(f"sequences nested deeper than {MAX_NESTING}")
        while offset < end:
            self._need(offset, 8, end, "element header")
            tag = self._tag(offset)
            if tag == ITEM_DELIMITER:
                if not until_delimiter:
                    raise MalformedDatasetError(f"item delimiter outside an item at byte {offset}")
                return offset + 8
            if tag in (ITEM, SEQUENCE_DELIMITER):
                raise MalformedDatasetError(
                    f"item tag {_tag_text(tag)} among elements at byte {offset}"
                )
            offset = self._element(offset, end, depth, implicit, top=top)
            if top:
                self.result.elements += 1
        if until_delimiter:
            raise MalformedDatasetError("item of undefined length without delimiter")
        return offset

    def _element(self, offset: int, end: int, depth: int, implicit: bool, *, top: bool) -> int:
        tag = self._tag(offset)
        if implicit:
            length = self.u32.unpack_from(self.data, offset + 4)[0]
            value = offset + 8
            vr = b""
        else:
            vr = bytes(self.data[offset + 4 : offset + 6])
            if vr in SHORT_VRS:
                length = self.u16.unpack_from(self.data, offset + 6)[0]
                value = offset + 8
            elif vr in LONG_VRS or (vr.isalpha() and vr.isupper()):
                # A VR this reader does not know is read like the long ones (PS3.5 6.2).
                self._need(offset, 12, end, _tag_text(tag))
                length = self.u32.unpack_from(self.data, offset + 8)[0]
                value = offset + 12
            else:
                raise MalformedDatasetError(
                    f"{_tag_text(tag)} has no valid VR {vr!r} (byte {offset})"
                )
        if top and tag in PIXEL_DATA_TAGS:
            self.result.pixel_data_elements += 1
        if top and tag == EXTENDED_OFFSET_TABLE:
            self.result.has_extended_offset_table = True
        if length == UNDEFINED_LENGTH:
            if tag == 0x7FE00010 and top:
                return self._encapsulated(tag, value, end)
            if implicit or vr == b"SQ":
                return self._sequence(tag, value, end, depth, implicit, defined_end=None)
            if vr == b"UN":  # content is implicit VR little endian (CP-246)
                return self._sequence(tag, value, end, depth, True, defined_end=None)
            raise MalformedDatasetError(
                f"{_tag_text(tag)} of VR {vr.decode()} has undefined length"
            )
        if value + length > end:
            raise MalformedDatasetError(
                f"{_tag_text(tag)} claims {length} bytes, {max(end - value, 0)} left "
                f"(byte {offset})"
            )
        if self._is_sequence(tag, vr, implicit) and length:
            self._sequence(tag, value, value + length, depth, implicit, defined_end=value + length)
        elif top and tag in PIXEL_DATA_TAGS:
            self.result.pixel_data = PixelDataLayout(
                tag=tag, encapsulated=False, value_offset=value, length=length
            )
        return value + length

    @staticmethod
    def _is_sequence(tag: int, vr: bytes, implicit: bool) -> bool:
        if not implicit:
            return vr == b"SQ"
        if (tag >> 16) & 1:  # private: its VR is unknown to the dictionary
            return False
        try:
            return dictionary_VR(tag) == "SQ"
        except KeyError:
            return False

    # --- sequences and items --------------------------------------------------------------

    def _sequence(
        self, tag: int, offset: int, end: int, depth: int, implicit: bool, defined_end
    ) -> int:
        limit = defined_end if defined_end is not None else end
        while offset < limit:
            self._need(offset, 8, limit, f"item of {_tag_text(tag)}")
            item_tag = self._tag(offset)
            length = self.u32.unpack_from(self.data, offset + 4)[0]
            if item_tag == SEQUENCE_DELIMITER:
                if defined_end is not None:
                    raise MalformedDatasetError(
                        f"{_tag_text(tag)} of defined length has a delimiter"
                    )
                return offset + 8
            if item_tag != ITEM:
                raise MalformedDatasetError(
                    f"{_tag_text(tag)} holds {_tag_text(item_tag)}, not an item (byte {offset})"
                )
            start = offset + 8
            if length == UNDEFINED_LENGTH:
                offset = self.elements(
                    start, limit, depth + 1, implicit, top=False, until_delimiter=True
                )
            else:
                if start + length > limit:
                    raise MalformedDatasetError(
                        f"item of {_tag_text(tag)} claims {length} bytes, {limit - start} left"
                    )
                self.elements(
                    start, start + length, depth + 1, implicit, top=False, until_delimiter=False
                )
                offset = start + length
        if defined_end is None:
            raise MalformedDatasetError(f"sequence {_tag_text(tag)} without delimiter")
        return offset

    def _encapsulated(self, tag: int, offset: int, end: int) -> int:
        """Pixel Data of undefined length: an offset table item, fragments, a delimiter."""
        items: list[tuple[int, int]] = []
        while True:
            self._need(offset, 8, end, "pixel data item")
            item_tag = self._tag(offset)
            length = self.u32.unpack_from(self.data, offset + 4)[0]
            if item_tag == SEQUENCE_DELIMITER:
                offset += 8
                break
            if item_tag != ITEM:
                raise MalformedDatasetError(
                    f"pixel data holds {_tag_text(item_tag)}, not a fragment (byte {offset})"
                )
            if length == UNDEFINED_LENGTH or offset + 8 + length > end:
                raise MalformedDatasetError(
                    f"pixel data fragment claims {length} bytes, "
                    f"{max(end - offset - 8, 0)} left (byte {offset})"
                )
            items.append((offset + 8, length))
            offset += 8 + length
        if not items:
            raise MalformedDatasetError("encapsulated pixel data without offset table item")
        self.result.pixel_data = PixelDataLayout(
            tag=tag, encapsulated=True, offset_table=items[0], fragments=tuple(items[1:])
        )
        return offset


def walk_dataset(
    data: bytes | memoryview, *, implicit_vr: bool, little_endian: bool
) -> DatasetStructure:
    """Walk every element of `data` (a dataset without file meta) to its very end.

    Raises MalformedDatasetError naming the element and byte where the structure breaks.
    """
    walker = _Walker(data, implicit_vr, little_endian)
    end = len(walker.data)
    if end == 0:
        raise MalformedDatasetError("the dataset is empty")
    walker.result.end = walker.elements(0, end, 0, implicit_vr, top=True, until_delimiter=False)
    return walker.result


def file_meta_end(data: bytes | memoryview) -> int:
    """Offset of the first dataset byte after the preamble, 'DICM' and the file meta.

    The file meta is always Explicit VR Little Endian; its group length is not trusted
    (some writers leave it out), the group 0002 elements are walked instead.
    """
    view = memoryview(data).cast("B")
    if len(view) < 132 or bytes(view[128:132]) != b"DICM":
        raise MalformedDatasetError("no DICM prefix after the preamble")
    offset = 132
    while offset + 8 <= len(view):
        group = struct.unpack_from("<H", view, offset)[0]
        if group != 0x0002:
            return offset
        vr = bytes(view[offset + 4 : offset + 6])
        if vr in SHORT_VRS:
            offset += 8 + struct.unpack_from("<H", view, offset + 6)[0]
        elif vr in LONG_VRS:
            if offset + 12 > len(view):
                break
            length = struct.unpack_from("<I", view, offset + 8)[0]
            if length == UNDEFINED_LENGTH:
                raise MalformedDatasetError("a file meta element has an undefined length")
            offset += 12 + length
        else:
            raise MalformedDatasetError(f"the file meta has an invalid VR {vr!r}")
    if offset > len(view):
        raise MalformedDatasetError("the file meta is cut")
    return offset
