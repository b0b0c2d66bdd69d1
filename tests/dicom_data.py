"""DICOM files and datasets as bytes, and a pynetdicom client that can send them as-is.

Bad inputs (no SOP Instance UID, a wrong SOP class, garbage instead of a dataset) cannot be
sent with a normal client, which checks them first; `send_files_raw` uses pynetdicom's
chunked mode, which sends the bytes after the file meta unchanged and takes the request's
Affected SOP Class/Instance UIDs from the file meta.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification


def file_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_raw_file(
    path: Path,
    body: bytes,
    *,
    sop_class: str,
    sop_instance: str,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> Path:
    """A file whose meta says `sop_class`/`sop_instance` followed by `body` as the dataset,
    unchanged (the meta is written alone: saving an empty dataset under a Deflated syntax
    would put an empty deflate stream before the body)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = transfer_syntax
    buffer = DicomBytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    path.write_bytes(buffer.getvalue() + body)
    return path


def encode_body(ds: Dataset, implicit_vr: bool = False) -> bytes:
    """The dataset (without file meta) in Explicit (or Implicit) VR Little Endian, as sent
    on the wire."""
    body = copy.copy(ds)
    if hasattr(body, "file_meta"):
        del body.file_meta
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = implicit_vr
    write_dataset(buffer, body)
    return buffer.getvalue()


@contextmanager
def association(
    host: str,
    port: int,
    called: str,
    contexts: Iterable[tuple[str, list[str]]],
    calling: str = "PYTEST",
) -> Iterator[Association]:
    ae = AE(ae_title=calling)
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, syntaxes)
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=called)
    assert assoc.is_established, "association was not accepted"
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


@contextmanager
def chunked_sending() -> Iterator[None]:
    """Make pynetdicom send files' datasets byte for byte, unchecked."""
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous


def read_stored(path: Path) -> Dataset:
    return dcmread(path)
