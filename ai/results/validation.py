"""Argument checks shared by the result builders.

Each check raises ValueError naming the offending argument, so that a caller (the worker)
can log a precise reason instead of a stack trace from deep inside highdicom or pydicom.
"""

import math

from pydicom import Dataset
from pydicom.uid import UID


def _is_valid_uid(value: object) -> bool:
    return isinstance(value, str) and UID(value).is_valid


def require_probability(name: str, value: float) -> float:
    """A finite number in [0, 1]; bools are refused because they are almost always a bug."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    value = float(value)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return value


def require_text(name: str, value: str, max_length: int = 64) -> str:
    """A non-empty string that fits the VR it will be written into (LO/SH/UT limits)."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    if len(value) > max_length:
        raise ValueError(f"{name} must be at most {max_length} characters, got {len(value)}")
    if "\\" in value:
        raise ValueError(f"{name} must not contain a backslash (DICOM value separator)")
    return value


def require_uid(name: str, value: str) -> str:
    """A syntactically valid DICOM UID (digits and dots, at most 64 characters)."""
    if not _is_valid_uid(value):
        raise ValueError(f"{name} must be a valid DICOM UID, got {value!r}")
    return value


def require_positive_int(name: str, value: int) -> int:
    """Series and instance numbers are IS values; DICOM expects them to be positive."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**31:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def require_source_image(name: str, source: Dataset) -> Dataset:
    """The source must identify itself, its series and its study, or a result cannot point
    back at it (the SR's evidence names all four)."""
    if not isinstance(source, Dataset):
        raise ValueError(f"{name} must be a pydicom Dataset, got {type(source).__name__}")
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        value = source.get(keyword)
        if not _is_valid_uid(str(value) if value else ""):
            raise ValueError(f"{name} lacks a valid {keyword}")
    return source


def require_new_instance(
    source: Dataset,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
    series_description: str,
    institution_name: str | None,
) -> None:
    """The identity of a result object: valid, and a new series and instance, not the source's."""
    require_uid("series_instance_uid", series_instance_uid)
    require_uid("sop_instance_uid", sop_instance_uid)
    require_positive_int("series_number", series_number)
    require_positive_int("instance_number", instance_number)
    require_text("series_description", series_description)
    if institution_name is not None:
        require_text("institution_name", institution_name)
    if sop_instance_uid == source.SOPInstanceUID:
        raise ValueError("sop_instance_uid must differ from the source's SOPInstanceUID")
    if series_instance_uid == source.get("SeriesInstanceUID"):
        raise ValueError("series_instance_uid must be a new series, not the source's")
