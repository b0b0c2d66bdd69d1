"""Images to send to a node: the SIIM sample of 200 chest X-rays (where it is, and its
files), and small valid greyscale images made on the fly."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

# Where the sample lies in a checkout: ../shared/data/siim_small beside the repository.
SHARED_SIIM = Path(__file__).resolve().parents[3] / "shared" / "data" / "siim_small"


def siim_dir() -> Path:
    """The 200 SIIM files: ../shared/data/siim_small next to the repo, or $PNEUMONODE_SIIM_DIR
    (for example a folder written by `pneumonode sample-data DIR`: DIR/train/**/*.dcm and
    DIR/labels.csv)."""
    override = os.environ.get("PNEUMONODE_SIIM_DIR")
    return Path(override) if override else SHARED_SIIM


def siim_missing_reason() -> str | None:
    """Why the SIIM sample cannot be used here, or None when it can: a clone without
    ../shared beside it has none (its tests skip with this reason, benchmarks stop)."""
    path = siim_dir()
    if not (path / "train").is_dir() or next((path / "train").rglob("*.dcm"), None) is None:
        return (
            f"SIIM sample not found at {path}; run `pneumonode sample-data DIR` "
            "and set PNEUMONODE_SIIM_DIR=DIR"
        )
    return None


def siim_files(folder: Path | None = None) -> list[Path]:
    """Every DICOM file of the SIIM sample in `folder` (`siim_dir()` when None), sorted;
    FileNotFoundError, saying how to get the sample, when it is missing."""
    if folder is None:
        reason = siim_missing_reason()
        if reason is not None:
            raise FileNotFoundError(reason)
        folder = siim_dir()
    return sorted((folder / "train").rglob("*.dcm"))


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
