"""The keys of a query: what a request carries (`QueryKey`) and what the index can answer
(`KEY_SPECS`), and the VR a key is matched and returned with.

Keys the node can match are those of the query level and the levels above it (a lenient
superset of the hierarchical model that most archives share: a Patient Root STUDY query may
ask for PatientName), and any other top-level attribute the stored instances hold
(PatientAge, ViewPosition, ...: the instance_attribute rows), matched and returned at STUDY
and SERIES level from the instances of that study or series, as Orthanc does. A sequence,
or a key of the index's own levels below the query level (Modality in a STUDY query), is
returned zero-length and not matched on (`KeyRole.UNSUPPORTED`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR

from storage.query.matching import MatchKind, is_universal
from storage.query.model import Level

# Elements the node fills in a response itself rather than matching on.
QUERY_LEVEL_TAG = 0x00080052
RETRIEVE_AE_TAG = 0x00080054
CHARSET_TAG = 0x00080005
SCP_FILLED = frozenset({QUERY_LEVEL_TAG, RETRIEVE_AE_TAG, CHARSET_TAG})


@dataclass(frozen=True)
class QueryKey:
    """One key of a request: returned always, matched on when it has values.

    `vr` is the VR the requester gave ("" when none; a DIMSE identifier in explicit VR may
    give one the dictionary does not), `values` the stripped, non-empty values (none:
    a return key only), `sequence_items` whether a sequence key carries items (sequence
    matching, which the index cannot do).
    """

    tag: int
    keyword: str  # the PS3.6 keyword, or the tag as "(gggg,eeee)" when it has none
    vr: str
    values: tuple[str, ...] = ()
    sequence_items: bool = False

    @property
    def is_universal(self) -> bool:
        """Whether the key asks for nothing but its value: matching it selects everything."""
        return not self.sequence_items and is_universal(self.values)


@dataclass(frozen=True)
class KeySpec:
    """One matching/return key the index can answer, and the level that owns it."""

    keyword: str
    level: Level
    kind: MatchKind
    column: str | None = None  # column of the level's table; None for computed keys
    match_column: str | None = None  # the column matched on, when not `column`


def _keys(level: Level, *specs: tuple[str, MatchKind, str | None]) -> list[KeySpec]:
    return [
        KeySpec(
            keyword,
            level,
            kind,
            column,
            f"{column}_folded" if kind is MatchKind.PERSON_NAME else None,
        )
        for keyword, kind, column in specs
    ]


KEY_SPECS: dict[str, KeySpec] = {
    spec.keyword: spec
    for spec in (
        _keys(
            Level.PATIENT,
            ("PatientID", MatchKind.TEXT, "patient_id"),
            ("PatientName", MatchKind.PERSON_NAME, "patient_name"),
            ("PatientBirthDate", MatchKind.DATE, "patient_birth_date"),
            ("PatientSex", MatchKind.TEXT, "patient_sex"),
            ("NumberOfPatientRelatedStudies", MatchKind.COUNT, None),
            ("NumberOfPatientRelatedSeries", MatchKind.COUNT, None),
            ("NumberOfPatientRelatedInstances", MatchKind.COUNT, None),
        )
        + _keys(
            Level.STUDY,
            ("StudyInstanceUID", MatchKind.UID, "study_instance_uid"),
            ("StudyDate", MatchKind.DATE, "study_date"),
            ("StudyTime", MatchKind.TIME, "study_time"),
            ("AccessionNumber", MatchKind.TEXT, "accession_number"),
            ("StudyID", MatchKind.TEXT, "study_id"),
            ("StudyDescription", MatchKind.TEXT, "study_description"),
            ("ReferringPhysicianName", MatchKind.PERSON_NAME, "referring_physician_name"),
            ("ModalitiesInStudy", MatchKind.MODALITIES, None),
            ("SOPClassesInStudy", MatchKind.SOP_CLASSES, None),
            ("NumberOfStudyRelatedSeries", MatchKind.COUNT, None),
            ("NumberOfStudyRelatedInstances", MatchKind.COUNT, None),
        )
        + _keys(
            Level.SERIES,
            ("SeriesInstanceUID", MatchKind.UID, "series_instance_uid"),
            ("Modality", MatchKind.TEXT, "modality"),
            ("SeriesNumber", MatchKind.NUMBER, "series_number"),
            ("SeriesDescription", MatchKind.TEXT, "series_description"),
            ("BodyPartExamined", MatchKind.TEXT, "body_part_examined"),
            ("NumberOfSeriesRelatedInstances", MatchKind.COUNT, None),
        )
        + _keys(
            Level.IMAGE,
            ("SOPInstanceUID", MatchKind.UID, "sop_instance_uid"),
            ("SOPClassUID", MatchKind.UID, "sop_class_uid"),
            ("InstanceNumber", MatchKind.NUMBER, "instance_number"),
            ("AcquisitionDateTime", MatchKind.DATETIME, "acquisition_date_time"),
            ("Rows", MatchKind.NUMBER, "rows"),
            ("Columns", MatchKind.NUMBER, "columns"),
            ("NumberOfFrames", MatchKind.NUMBER, "number_of_frames"),
            ("SamplesPerPixel", MatchKind.NUMBER, "samples_per_pixel"),
            ("PhotometricInterpretation", MatchKind.TEXT, "photometric_interpretation"),
        )
    )
}


class KeyRole(enum.Enum):
    """How a query at some level treats one of its keys."""

    INDEXED = "indexed"  # a column or computed aggregate of the index (its KeySpec)
    ATTRIBUTE = "attribute"  # any other top-level attribute: the instance_attribute rows
    UNSUPPORTED = "unsupported"  # a sequence or a lower level's key: returned zero-length


def key_role(key: QueryKey, level: Level) -> tuple[KeyRole, KeySpec | None]:
    """The role of `key` in a query at `level`, with its KeySpec when it is INDEXED."""
    spec = KEY_SPECS.get(key.keyword)
    if spec is None and key.vr != "SQ":
        return KeyRole.ATTRIBUTE, None
    if key.vr == "SQ" or spec is None or spec.level > level:
        return KeyRole.UNSUPPORTED, None
    return KeyRole.INDEXED, spec


def attribute_vr(key: QueryKey) -> str:
    """The VR an instance_attribute key is matched and returned with: the dictionary's,
    else the requester's, else LO."""
    try:
        return dictionary_VR(key.tag).split(" or ")[0]
    except KeyError:
        vr = key.vr
        return vr if vr and vr != "UN" and " or " not in vr else "LO"


def empty_key_vr(key: QueryKey) -> str:
    """The VR a requested key the node returns zero-length is written with: the
    requester's, else the dictionary's, else UN."""
    vr = key.vr
    if not vr or " or " in vr:
        try:
            vr = dictionary_VR(key.tag).split(" or ")[0]
        except KeyError:
            vr = "UN"
    return vr
