"""Decide whether received bytes are an instance the archive can keep and give back.

Every way in (C-STORE, `pneumonode import`) passes through `inspect_instance` before
anything is written: the size limit, the file meta, a bounded inflate of Deflated data,
the element structure walked to its end in the transfer syntax's own encoding, the pixel
data checked against the header, and optionally every frame decoded. What passes is
returned as its parsed header (pixel data not read); what fails raises the StoreError
subclass that names the reason.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID

from storage.errors import (
    DeflateError,
    EncodingMismatchError,
    TooLargeError,
    UnreadableDatasetError,
)
from storage.pixel_checks import check_pixel_data, decode_every_frame
from storage.structure import DatasetStructure, MalformedDatasetError, file_meta_end, walk_dataset

MIB = 1 << 20
_INFLATE_CHUNK = 4 * MIB
# Some writers end the raw deflate stream with a zlib or gzip trailer (checksum, size) or
# a padding byte; more than that after the stream's end is not part of the dataset.
_DEFLATE_TRAILER = 8


@dataclass(frozen=True)
class IntakeChecks:
    """The configurable part of the checks (storage.max_instance_mib, verify_pixels)."""

    max_instance_bytes: int = 256 * MIB
    verify_pixels: bool = False


def inflate_bounded(deflated: bytes | memoryview, limit: int) -> bytes:
    """Inflate raw deflate data, refusing as soon as the output would exceed `limit`."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    parts: list[bytes] = []
    produced = 0
    pending = bytes(deflated)
    try:
        while True:
            chunk = inflater.decompress(pending, _INFLATE_CHUNK)
            produced += len(chunk)
            if produced > limit:
                raise TooLargeError(
                    f"the Deflated dataset inflates past {limit // MIB} MiB "
                    "(storage.max_instance_mib)"
                )
            parts.append(chunk)
            pending = inflater.unconsumed_tail
            if inflater.eof or not pending:
                break
        if not inflater.eof:
            parts.append(inflater.flush())
    except zlib.error as exc:
        raise DeflateError(f"the Deflated dataset does not inflate: {exc}") from exc
    if not inflater.eof:
        raise DeflateError("the Deflated dataset's deflate stream is cut")
    if len(inflater.unused_data) > _DEFLATE_TRAILER:
        raise DeflateError("bytes follow the end of the deflate stream")
    return b"".join(parts)


def _walk(body: bytes | memoryview, transfer_syntax: UID) -> DatasetStructure:
    """The structure of `body`, or the reason it cannot be read back."""
    implicit = transfer_syntax.is_implicit_VR
    little = transfer_syntax.is_little_endian
    try:
        return walk_dataset(body, implicit_vr=implicit, little_endian=little)
    except MalformedDatasetError as exc:
        reason = str(exc)
    try:  # the failure path only: a sender that encoded in the other VR mode?
        walk_dataset(body, implicit_vr=not implicit, little_endian=little)
    except MalformedDatasetError:
        raise UnreadableDatasetError(f"cannot parse: {reason}") from None
    encoded = "Explicit" if implicit else "Implicit"
    raise EncodingMismatchError(
        f"encoded {encoded} VR, unlike its transfer syntax {transfer_syntax.name}"
    )


# Where dcmread's stop_before_pixels stops: any of the three pixel data elements.
_PIXEL_DATA_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})


def _before_pixel_data(tag: int, vr: str | None, length: int) -> bool:
    return tag in _PIXEL_DATA_TAGS


def _parse_header(meta: FileMetaDataset, body: bytes | memoryview, transfer_syntax: UID) -> Dataset:
    """pydicom's reading of everything before the pixel data (public API only).

    Only the dataset is read: the file meta was read already (or, for a C-STORE, built
    by the node itself), and a Deflated body was inflated within bounds already, so it is
    read as the Explicit VR Little Endian it now is, not inflated a second time.
    """
    deflated = transfer_syntax.is_deflated
    header = read_dataset(
        io.BytesIO(body),
        is_implicit_VR=transfer_syntax.is_implicit_VR and not deflated,
        is_little_endian=transfer_syntax.is_little_endian or deflated,
        stop_when=_before_pixel_data,
    )
    header.file_meta = meta
    return header


def _read_file_meta(data: bytes | memoryview) -> tuple[FileMetaDataset, int]:
    """The file meta of a whole DICOM file, and where the dataset after it starts."""
    try:
        meta_end = file_meta_end(data)
        meta = dcmread(io.BytesIO(bytes(data[:meta_end])), stop_before_pixels=True).file_meta
    except MalformedDatasetError as exc:
        raise UnreadableDatasetError(f"cannot parse the file meta: {exc}") from exc
    except Exception as exc:  # pydicom raises a wide range of errors on corrupt input
        raise UnreadableDatasetError(f"cannot parse the file meta: {exc}") from exc
    return meta, meta_end


def inspect_instance(
    data: bytes | memoryview,
    checks: IntakeChecks = IntakeChecks(),
    *,
    known_meta: tuple[FileMetaDataset, int] | None = None,
) -> Dataset:
    """The header of a whole DICOM file, once it is known to read back; else a StoreError.

    `known_meta` is (file meta, where the dataset starts) when the caller wrote the file
    meta itself (a received C-STORE dataset: storage.file_meta), so it is not read again.
    """
    if len(data) > checks.max_instance_bytes:
        raise TooLargeError(
            f"instance of {len(data)} bytes exceeds {checks.max_instance_bytes // MIB} MiB "
            "(storage.max_instance_mib)"
        )
    meta, meta_end = known_meta if known_meta is not None else _read_file_meta(data)
    transfer_syntax = UID(str(meta.get("TransferSyntaxUID", "") or "").strip())
    if not transfer_syntax.is_transfer_syntax:
        raise UnreadableDatasetError(f"unknown transfer syntax {str(transfer_syntax)[:64]!r}")
    body: bytes | memoryview = memoryview(data)[meta_end:]
    if transfer_syntax.is_deflated:
        body = inflate_bounded(body, checks.max_instance_bytes)
    structure = _walk(body, transfer_syntax)
    try:
        header = _parse_header(meta, body, transfer_syntax)
    except Exception as exc:  # the structure is sound, so this is a value pydicom rejects
        raise UnreadableDatasetError(f"cannot parse: {type(exc).__name__}: {exc}") from exc
    check_pixel_data(header, structure, memoryview(body), transfer_syntax)
    if checks.verify_pixels and structure.pixel_data is not None:
        decode_every_frame(data)
    return header
