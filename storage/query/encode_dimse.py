"""DIMSE response identifiers of a prepared find: pydicom Datasets, or the same identifiers
encoded straight from index rows, without a Dataset per match.

Responses hold exactly the requested keys, plus QueryRetrieveLevel and RetrieveAETitle,
plus SpecificCharacterSet "ISO_IR 192" when a returned value is not plain ASCII (else the
character set the query named). A key the node does not answer is returned zero-length
(an empty sequence for SQ). Another protocol's encoder (DICOM JSON for QIDO-RS) reads the
same rows of the same PreparedFind and sits beside this one.

Building a pydicom Dataset for every match and letting pydicom write it costs more than the
SQL that found the match: at 10,000 studies it is most of a query's time. The keys of a
query are known before the first row arrives, so `IdentifierEncoder` works out once, per
key, its tag, its VR, the element header and how a row value becomes bytes; each row then
costs a few string operations and one join. QueryRetrieveLevel and RetrieveAETitle are the
same for every match and are encoded once.

The bytes are exactly what pydicom writes for the Dataset that `response_datasets`
builds (tests/test_find_query.py compares both on every key kind): elements in tag order,
text padded with a space and UIDs with a NUL to even length, binary numbers (US, SL, FD...)
packed, the values of a multi-valued key joined with backslashes, and SpecificCharacterSet
"ISO_IR 192" (values encoded as UTF-8) as soon as one value is not plain ASCII, else the
character set the query named. Only the Little Endian transfer syntaxes (implicit and
explicit VR) are encoded here; anything else goes through pydicom.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Sequence

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from sqlalchemy import Connection

from storage.query.keys import (
    CHARSET_TAG,
    QUERY_LEVEL_TAG,
    RETRIEVE_AE_TAG,
    KeySpec,
    QueryKey,
    attribute_vr,
    empty_key_vr,
)
from storage.query.matching import MatchKind
from storage.query.sql import PreparedFind

# VRs whose explicit VR encoding has two reserved bytes and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"}
)
_BINARY = {
    "US": ("<H", int),
    "SS": ("<h", int),
    "UL": ("<I", int),
    "SL": ("<i", int),
    "UV": ("<Q", int),
    "SV": ("<q", int),
    "FL": ("<f", float),
    "FD": ("<d", float),
}
UTF8_CHARSET = "ISO_IR 192"

# A value converter: row value -> (encoded bytes, needs UTF-8). Text converters return str.
_Convert = Callable[[object], "tuple[bytes | str, bool]"]


class _Head:
    """The header of one element for one encoding: tag, VR if explicit, then the length."""

    def __init__(self, tag: int, vr: str, implicit: bool) -> None:
        tag_bytes = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
        if implicit:
            self.prefix, self.length = tag_bytes, struct.Struct("<I").pack
        elif vr in _LONG_VRS:
            self.prefix, self.length = tag_bytes + vr.encode() + b"\0\0", struct.Struct("<I").pack
        else:
            self.prefix, self.length = tag_bytes + vr.encode(), struct.Struct("<H").pack

    def element(self, value: bytes) -> bytes:
        return self.prefix + self.length(len(value)) + value


def _pad(vr: str) -> bytes:
    return b"\0" if vr == "UI" else b" "


def _text(value: object) -> tuple[str, bool]:
    if value is None or value == "":
        return "", False
    text = value if isinstance(value, str) else str(value)
    return text, not text.isascii()


def _sorted_set(value: object) -> tuple[str, bool]:
    """ModalitiesInStudy / SOPClassesInStudy: the distinct values, sorted, as one text."""
    if value is None or value == "":
        return "", False
    text = "\\".join(sorted(set(str(value).split("\\"))))
    return text, not text.isascii()


def _binary(vr: str) -> _Convert:
    fmt, cast = _BINARY[vr]
    pack = struct.Struct(fmt).pack

    def convert(value: object) -> tuple[bytes, bool]:
        if value is None or value == "":
            return b"", False
        try:
            return b"".join(pack(cast(v)) for v in str(value).split("\\")), False
        except (ValueError, struct.error):
            return b"", False  # as response_datasets: a value it cannot read is empty

    return convert


def _spec_binary(vr: str) -> _Convert:
    """Indexed numeric columns (Rows, Columns...): integers from the database."""
    pack = struct.Struct(_BINARY[vr][0]).pack

    def convert(value: object) -> tuple[bytes, bool]:
        return (b"", False) if value is None else (pack(int(value)), False)  # type: ignore[call-overload]

    return convert


def response_datasets(
    prepared: PreparedFind, conn: Connection, retrieve_ae_title: str
) -> Iterator[Dataset]:
    """Yield one response identifier per match, streaming rows from the database."""
    result = conn.execution_options(yield_per=256).execute(prepared.statement)
    for row in result:
        yield _identifier(prepared, row._mapping, retrieve_ae_title)


def encoded_responses(
    prepared: PreparedFind, conn: Connection, retrieve_ae_title: str, *, implicit_vr: bool
) -> Iterator[bytes]:
    """The identifiers of `response_datasets`, already encoded in a Little Endian transfer
    syntax: the same bytes, without a Dataset per match."""
    encode = IdentifierEncoder(prepared, retrieve_ae_title, implicit_vr=implicit_vr).encode
    result = conn.execution_options(yield_per=1024).execute(prepared.statement)
    for partition in result.partitions():
        for row in partition:
            yield encode(row)


# --- as pydicom Datasets -----------------------------------------------------------------


def _identifier(prepared: PreparedFind, row, retrieve_ae_title: str) -> Dataset:
    ds = Dataset()
    needs_utf8 = False
    for key in prepared.return_keys:
        if key.spec is None and key.label is not None:
            attribute = _attribute_element(key.key, row[key.label])
            needs_utf8 = needs_utf8 or _needs_utf8(attribute.value)
            ds.add(attribute)
            continue
        if key.spec is None:
            ds.add(_empty_element(key.key))
            continue
        value = _response_value(key.spec, row[key.label])
        needs_utf8 = needs_utf8 or _needs_utf8(value)
        ds.add(DataElement(key.key.tag, dictionary_VR(key.key.tag), value))
    ds.QueryRetrieveLevel = prepared.level.name
    ds.RetrieveAETitle = retrieve_ae_title
    character_sets = prepared.request.character_sets
    if needs_utf8:
        ds.SpecificCharacterSet = UTF8_CHARSET
    elif character_sets:
        ds.SpecificCharacterSet = list(character_sets)
    return ds


def _attribute_element(key: QueryKey, raw: object) -> DataElement:
    vr = attribute_vr(key)
    if raw is None or raw == "":
        return DataElement(key.tag, vr, None)
    values: list = str(raw).split("\\")
    binary = _BINARY.get(vr)
    if binary is not None:
        try:
            values = [binary[1](v) for v in values]
        except ValueError:
            return DataElement(key.tag, vr, None)
    return DataElement(key.tag, vr, values if len(values) > 1 else values[0])


def _response_value(spec: KeySpec, raw: object) -> object:
    if raw is None or raw == "":
        return None
    if spec.kind in (MatchKind.MODALITIES, MatchKind.SOP_CLASSES):
        return sorted(set(str(raw).split("\\")))
    return raw


def _empty_element(key: QueryKey) -> DataElement:
    """The requested element, zero-length (an empty sequence for SQ)."""
    vr = empty_key_vr(key)
    if vr == "SQ":
        return DataElement(key.tag, "SQ", DicomSequence())
    return DataElement(key.tag, vr, None)


def _needs_utf8(value: object) -> bool:
    if isinstance(value, str):
        return not value.isascii()
    if isinstance(value, list):
        return any(_needs_utf8(v) for v in value)
    return False


# --- as bytes ----------------------------------------------------------------------------


class IdentifierEncoder:
    """Encodes the response identifier of one match from its row, for one transfer syntax."""

    def __init__(
        self, prepared: PreparedFind, retrieve_ae_title: str, *, implicit_vr: bool
    ) -> None:
        self.implicit_vr = implicit_vr
        self.requested_charset = prepared.request.character_sets
        positions = {
            column.key: index for index, column in enumerate(prepared.statement.selected_columns)
        }
        # (tag, position in the row or None for a fixed element, head, converter or bytes, pad)
        parts: list[tuple[int, int | None, _Head, _Convert | bytes, bytes]] = []
        for key in prepared.return_keys:
            tag = key.key.tag
            if key.spec is None and key.label is None:
                vr = empty_key_vr(key.key)
                parts.append((tag, None, _Head(tag, vr, implicit_vr), b"", b""))
                continue
            if key.spec is None:
                vr = attribute_vr(key.key)
                convert: _Convert = _binary(vr) if vr in _BINARY else _text
            else:
                vr = dictionary_VR(tag)
                if key.spec.kind in (MatchKind.MODALITIES, MatchKind.SOP_CLASSES):
                    convert = _sorted_set
                else:
                    convert = _spec_binary(vr) if vr in _BINARY else _text
            position = positions[key.label]
            parts.append((tag, position, _Head(tag, vr, implicit_vr), convert, _pad(vr)))
        level = prepared.level.name.encode()
        ae_title = retrieve_ae_title.encode("ascii", "replace")
        parts.append((QUERY_LEVEL_TAG, None, _Head(QUERY_LEVEL_TAG, "CS", implicit_vr),
                      _padded(level, b" "), b""))  # fmt: skip
        parts.append((RETRIEVE_AE_TAG, None, _Head(RETRIEVE_AE_TAG, "AE", implicit_vr),
                      _padded(ae_title, b" "), b""))  # fmt: skip
        parts.sort(key=lambda part: part[0])
        self._parts = [(position, head, value, pad) for _, position, head, value, pad in parts]
        self._charset_head = _Head(CHARSET_TAG, "CS", implicit_vr)
        self._utf8_charset = self._charset_head.element(_padded(UTF8_CHARSET.encode(), b" "))
        self._requested = (
            self._charset_head.element(_padded("\\".join(self.requested_charset).encode(), b" "))
            if self.requested_charset
            else b""
        )

    def encode(self, row: Sequence[object]) -> bytes:
        """The identifier of one match, ready to be a C-FIND response's data set."""
        texts: list[tuple[_Head, str | bytes, bytes]] = []
        utf8 = False
        for position, head, value, pad in self._parts:
            if position is None:
                texts.append((head, value, pad))  # type: ignore[arg-type]
                continue
            converted, needs = value(row[position])  # type: ignore[operator]
            utf8 = utf8 or needs
            texts.append((head, converted, pad))
        encoding = "utf-8" if utf8 else "ascii"
        out = [self._utf8_charset if utf8 else self._requested]
        for head, converted, pad in texts:
            data = converted.encode(encoding) if isinstance(converted, str) else converted
            if len(data) & 1:
                data += pad
            out.append(head.prefix + head.length(len(data)) + data)
        return b"".join(out)


def _padded(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) & 1 else value
