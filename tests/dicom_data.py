"""Small DICOM objects made on the fly, and a pynetdicom client that can send them as-is.

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

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification

DX = DigitalXRayImageStorageForPresentation


def small_image(
    *,
    rows: int = 32,
    columns: int = 32,
    sop_class: str = DX,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    patient_id: str = "TEST-PATIENT",
    patient_name: str = "Test^Patient",
    series_description: str = "",
) -> Dataset:
    """A valid greyscale image dataset with a file meta in Explicit VR Little Endian."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.Modality = "DX"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SeriesDescription = series_description
    ds.BodyPartExamined = "CHEST"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    pixels = (np.arange(rows * columns, dtype=np.uint16) % 4096).reshape(rows, columns)
    ds.PixelData = pixels.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def second_copy(first: Dataset, series_description: str) -> Dataset:
    """Another copy of `first` (same SOP, study and series UIDs) that differs visibly."""
    return small_image(
        sop_uid=first.SOPInstanceUID,
        study_uid=first.StudyInstanceUID,
        series_uid=first.SeriesInstanceUID,
        patient_id=first.PatientID,
        series_description=series_description,
    )


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
