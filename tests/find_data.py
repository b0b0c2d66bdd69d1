"""Synthetic instances for the C-FIND tests, with known, distinct attribute values.

The SIIM files all share one date, time and modality, so these add what the matching
rules need: several studies per patient, several series per study, several modalities,
dates and times to range over (one time written as HHMM, one with a fraction), names
that differ only by case, a non-ASCII name, and IDs holding `%`, `_`, `!` and `[` so that
a wildcard query proves they are not SQL wildcards.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    MRImageStorage,
)

UID_ROOT = "1.2.826.0.1.3680043.8.498.90417"


@dataclass(frozen=True)
class SeriesSpec:
    number: int
    modality: str
    sop_class: str
    instances: int
    description: str = ""
    rows: int = 16


@dataclass(frozen=True)
class StudySpec:
    key: str
    date: str
    time: str
    accession: str
    description: str
    series: tuple[SeriesSpec, ...]


@dataclass(frozen=True)
class PatientSpec:
    patient_id: str
    name: str
    birth_date: str
    sex: str
    studies: tuple[StudySpec, ...]


CR = ComputedRadiographyImageStorage
DX = DigitalXRayImageStorageForPresentation

PATIENTS: tuple[PatientSpec, ...] = (
    PatientSpec(
        "FIND%1",
        "Müller^Hans",
        "19600101",
        "M",
        (
            StudySpec(
                "S1",
                "20200110",
                "083000.123",
                "ACC%1",
                "CHEST PA",
                (
                    SeriesSpec(1, "CR", CR, 2, "PA view", rows=512),
                    SeriesSpec(2, "DX", DX, 1, "LAT view"),
                ),
            ),
            StudySpec(
                "S2",
                "20210615",
                "0930",
                "ACC_2",
                "ABDOMEN",
                (SeriesSpec(3, "CT", CTImageStorage, 3, "AXIAL"),),
            ),
        ),
    ),
    PatientSpec(
        "FIND_2",
        "DOE^JANE",
        "19751231",
        "F",
        (
            StudySpec(
                "S3",
                "20200201",
                "101500",
                "ACCX3",
                "KNEE",
                (SeriesSpec(1, "MR", MRImageStorage, 1, "T1"),),
            ),
        ),
    ),
    PatientSpec(
        "FINDX3",
        "doe^john",
        "19800505",
        "M",
        (
            StudySpec(
                "S4",
                "19991231",
                "235959",
                "ACC!4",
                "CHEST AP",
                (SeriesSpec(7, "CR", CR, 1, "AP view"),),
            ),
        ),
    ),
    PatientSpec(
        "FIND!4",
        "SMITH^ANNA",
        "",
        "F",
        (
            StudySpec(
                "S5",
                "20220303",
                "14",
                "ACC[5]",
                "HAND",
                (SeriesSpec(1, "DX", DX, 1, "hand 50%"),),
            ),
        ),
    ),
    PatientSpec(
        "FIND[5]",
        "BRACKET^BOB",
        "",
        "O",
        (
            StudySpec(
                "S6",
                "20220304",
                "120000",
                "ACC6",
                "FOOT",
                (SeriesSpec(1, "DX", DX, 1, "foot_1"),),
            ),
        ),
    ),
)


def study_uid(study_key: str) -> str:
    return f"{UID_ROOT}.1.{study_key[1:]}"


def series_uid(study_key: str, number: int) -> str:
    return f"{UID_ROOT}.2.{study_key[1:]}.{number}"


def sop_uid(study_key: str, series_number: int, index: int) -> str:
    return f"{UID_ROOT}.3.{study_key[1:]}.{series_number}.{index}"


def _instance(patient: PatientSpec, study: StudySpec, series: SeriesSpec, index: int) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = series.sop_class
    ds.SOPInstanceUID = sop_uid(study.key, series.number, index)
    ds.PatientID = patient.patient_id
    ds.PatientName = patient.name
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.StudyInstanceUID = study_uid(study.key)
    ds.StudyDate = study.date
    ds.StudyTime = study.time
    ds.AccessionNumber = study.accession
    ds.StudyID = study.key
    ds.StudyDescription = study.description
    ds.ReferringPhysicianName = "HOUSE^GREGORY"
    ds.SeriesInstanceUID = series_uid(study.key, series.number)
    ds.Modality = series.modality
    ds.SeriesNumber = series.number
    ds.SeriesDescription = series.description
    ds.BodyPartExamined = "CHEST"
    ds.InstanceNumber = index
    ds.AcquisitionDateTime = f"{study.date}{study.time.split('.')[0].ljust(6, '0')}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = series.rows
    ds.Columns = 16
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(series.rows * 16)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def synthetic_instances() -> list[Dataset]:
    """Every synthetic instance, built fresh."""
    return [
        _instance(patient, study, series, index)
        for patient in PATIENTS
        for study in patient.studies
        for series in study.series
        for index in range(1, series.instances + 1)
    ]


def all_studies() -> list[tuple[PatientSpec, StudySpec]]:
    return [(patient, study) for patient in PATIENTS for study in patient.studies]


def study_by_key(key: str) -> StudySpec:
    return next(study for _, study in all_studies() if study.key == key)


SYNTHETIC_INSTANCE_COUNT = sum(
    series.instances for _, study in all_studies() for series in study.series
)
