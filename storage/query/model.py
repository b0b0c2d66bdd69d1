"""The Query/Retrieve information model (PS3.4 C.6): its roots, levels and unique keys.

Plain enums, so that a request names its model without a SOP class UID: which SOP class
means which root is the DIMSE adapter's business (storage.query.identifier).
"""

from __future__ import annotations

import enum


class QueryModel(enum.Enum):
    """The information model a query is made in: where its hierarchy starts."""

    PATIENT_ROOT = "patient root"
    STUDY_ROOT = "study root"


class Level(enum.IntEnum):
    PATIENT = 0
    STUDY = 1
    SERIES = 2
    IMAGE = 3


UNIQUE_KEYS = {
    Level.PATIENT: "PatientID",
    Level.STUDY: "StudyInstanceUID",
    Level.SERIES: "SeriesInstanceUID",
    Level.IMAGE: "SOPInstanceUID",
}
