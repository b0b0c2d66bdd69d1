"""C-FIND matching over the index: a query identifier in, response identifiers out.

No networking here: `prepare_find` turns a Query/Retrieve identifier (a pydicom Dataset)
and an information model into one SQL statement, and `PreparedFind.responses` streams the
response identifiers from it (`encoded_responses`: the same identifiers already encoded, by
storage/find_rows.py, without a Dataset per match). The rules, from PS3.4 C.2.2 and C.4.1:

- Levels PATIENT (Patient Root only), STUDY, SERIES and IMAGE. Relational queries (the
  default) may leave out the unique keys above the level; hierarchical ones must give each
  with a single value (a UID key may hold a list of UIDs), Patient Root putting PatientID
  above STUDY. Breaking these raises `IdentifierMismatchError` (the SCP answers 0xA900).
- Matching: universal (empty, or only `*`), single value, wildcard `*`/`?` (not for UI,
  DA, TM, DT and numeric keys), list of UIDs for UI keys, ranges `a-b`, `a-`, `-b` for DA,
  TM and DT; several values of a non-UID key match if any value matches (PS3.4 C.2.2.2.8).
  Text is case-sensitive; person names (PN) are matched without regard to case in every
  script (Unicode case folding, on an indexed folded column), and a query without `=` is
  matched against the alphabetic group of a stored name.
- TM and DT values match to the precision they are written in: `0930` as a single value
  or an upper bound covers 09:30:00 to 09:30:59.999999, and stored times written with
  fewer digits (`09`, `0930`) compare as if padded with zeros.
- Keys the node can match are those of the query level and the levels above it (a
  lenient superset of the hierarchical model that most archives share: a Patient Root
  STUDY query may ask for PatientName), and any other top-level attribute the stored
  instances hold (PatientAge, ViewPosition, ...: the instance_attribute rows), matched
  and returned at STUDY and SERIES level from the instances of that study or series, as
  Orthanc does. A sequence, or a key of the index's own levels below the query level
  (Modality in a STUDY query), is returned zero-length; if it carries a value, it is not
  used for matching (PS3.4 lets an SCP ignore optional keys it does not support) and
  `PreparedFind.ignored_keys` names it, so that the SCP answers with Pending 0xFF01
  instead of 0xFF00: the caller learns the filter was not applied.
- Values the node cannot understand (a malformed date, a non-numeric SeriesNumber, an
  element pydicom cannot decode) raise `UnprocessableQueryError` (0xC000).
- Responses hold exactly the requested keys, plus QueryRetrieveLevel and RetrieveAETitle,
  plus SpecificCharacterSet "ISO_IR 192" when a returned value is not plain ASCII.

Counts, ModalitiesInStudy and SOPClassesInStudy are correlated SQL aggregates inside the
same statement, so one C-FIND is one query whatever it asks for.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from sqlalchemy import (
    Boolean,
    ColumnElement,
    Connection,
    Engine,
    Select,
    and_,
    case,
    exists,
    func,
    literal,
    or_,
    select,
)
from sqlalchemy.ext.compiler import compiles

from storage.find_rows import IdentifierEncoder
from storage.models import Instance, InstanceAttribute, Patient, Series, Study
from storage.text import fold_case

# --- errors ------------------------------------------------------------------------------


class QueryError(Exception):
    """An identifier the node will not process; `comment` fits a DIMSE ErrorComment (LO)."""

    def __init__(self, comment: str, offending: tuple[int, ...] = ()) -> None:
        super().__init__(comment)
        self.comment = comment[:64]
        self.offending = offending


class IdentifierMismatchError(QueryError):
    """The identifier breaks the information model (level, hierarchy): status 0xA900."""


class UnprocessableQueryError(QueryError):
    """A value the node cannot understand or match (bad date, undecodable): 0xC000."""


# --- information model -------------------------------------------------------------------


PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


class QueryModel(enum.Enum):
    PATIENT_ROOT = "patient root"
    STUDY_ROOT = "study root"

    @classmethod
    def from_sop_class(cls, sop_class_uid: str) -> QueryModel:
        """The model of a FIND SOP class; ValueError for any other SOP class."""
        models = {PATIENT_ROOT_FIND: cls.PATIENT_ROOT, STUDY_ROOT_FIND: cls.STUDY_ROOT}
        try:
            return models[str(sop_class_uid)]
        except KeyError:
            raise ValueError(f"{sop_class_uid} is not a Patient or Study Root FIND class") from None


class Level(enum.IntEnum):
    PATIENT = 0
    STUDY = 1
    SERIES = 2
    IMAGE = 3


class MatchKind(enum.Enum):
    TEXT = "text"  # single value and wildcard, case-sensitive
    PERSON_NAME = "pn"  # single value and wildcard, case-insensitive, by component group
    UID = "uid"  # single value and list of UIDs
    DATE = "da"
    TIME = "tm"
    DATETIME = "dt"
    NUMBER = "number"  # IS/US stored as integers
    MODALITIES = "modalities"  # ModalitiesInStudy: a study matches if one series does
    SOP_CLASSES = "sop classes"  # SOPClassesInStudy: a study matches if one instance does
    COUNT = "count"  # computed, returned only


_patient = Patient.__table__
_study = Study.__table__
_series = Series.__table__
_instance = Instance.__table__
_attribute = InstanceAttribute.__table__
_LEVEL_TABLE = {
    Level.PATIENT: _patient,
    Level.STUDY: _study,
    Level.SERIES: _series,
    Level.IMAGE: _instance,
}


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


_KEY_SPECS: dict[str, KeySpec] = {
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

UNIQUE_KEYS = {
    Level.PATIENT: "PatientID",
    Level.STUDY: "StudyInstanceUID",
    Level.SERIES: "SeriesInstanceUID",
    Level.IMAGE: "SOPInstanceUID",
}

# Elements the SCP fills itself rather than matching on.
_QUERY_LEVEL_TAG = Tag("QueryRetrieveLevel")
_RETRIEVE_AE_TAG = Tag("RetrieveAETitle")
_CHARSET_TAG = Tag("SpecificCharacterSet")
_SCP_FILLED = {_QUERY_LEVEL_TAG, _RETRIEVE_AE_TAG, _CHARSET_TAG}
UTF8_CHARSET = "ISO_IR 192"


# --- case-sensitive LIKE -----------------------------------------------------------------

LIKE_ESCAPE = "!"


class _CaseSensitiveLike(ColumnElement[bool]):
    """`column LIKE pattern ESCAPE '!'`, case-sensitive on every backend.

    PostgreSQL's LIKE is case-sensitive already; SQLite's LIKE folds ASCII case, so there
    the same match is written as GLOB, which is case-sensitive and has no `%`/`_`.
    """

    type = Boolean()
    inherit_cache = False
    _is_implicitly_boolean = True  # a condition already: no "= 1" in OR (it hides the index)

    def __init__(self, column: ColumnElement, dicom_pattern: str) -> None:
        self.column = column
        self.dicom_pattern = dicom_pattern


@compiles(_CaseSensitiveLike)
def _compile_like(element: _CaseSensitiveLike, compiler, **kw) -> str:
    pattern = like_pattern(element.dicom_pattern)
    return compiler.process(element.column.like(pattern, escape=LIKE_ESCAPE), **kw)


@compiles(_CaseSensitiveLike, "sqlite")
def _compile_glob(element: _CaseSensitiveLike, compiler, **kw) -> str:
    pattern = glob_pattern(element.dicom_pattern)
    return compiler.process(element.column.op("GLOB")(pattern), **kw)


def like_pattern(dicom_pattern: str) -> str:
    """DICOM `*`/`?` as SQL LIKE `%`/`_`; literal `%`, `_` and `!` escaped with `!`."""
    out = []
    for char in dicom_pattern:
        if char == "*":
            out.append("%")
        elif char == "?":
            out.append("_")
        elif char in ("%", "_", LIKE_ESCAPE):
            out.append(LIKE_ESCAPE + char)
        else:
            out.append(char)
    return "".join(out)


def glob_pattern(dicom_pattern: str) -> str:
    """DICOM `*`/`?` kept as GLOB wildcards; a literal `[` becomes the class `[[]`."""
    return dicom_pattern.replace("[", "[[]")


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


# --- dates and times ---------------------------------------------------------------------

_DA = re.compile(r"\d{8}")
_TM = re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?")
_DT = re.compile(r"\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?")
# Upper ends of each component, used to extend a value to the end of its precision.
_TM_MAX = "235959.999999"
_DT_MAX = "99991231235959.999999"


def _normalise(kind: MatchKind, keyword: str, text: str) -> str:
    """A DA/TM/DT bound in its canonical digits, or UnprocessableQueryError."""
    if kind is MatchKind.DATE:
        value = text.replace(".", "") if len(text) == 10 else text  # ACR-NEMA YYYY.MM.DD
        ok = _DA.fullmatch(value)
    elif kind is MatchKind.TIME:
        value = text.replace(":", "")  # ACR-NEMA HH:MM:SS
        ok = _TM.fullmatch(value)
    else:
        value = text
        ok = _DT.fullmatch(value)
    if ok and not _components_in_range(kind, value):
        ok = None
    if not ok:
        raise UnprocessableQueryError(f"{keyword}: {text!r} is not a valid {kind.value.upper()}")
    return value


def _components_in_range(kind: MatchKind, value: str) -> bool:
    """Hours 0-23, minutes 0-59, seconds 0-60 (leap); months 1-12 and days 1-31."""
    if kind is MatchKind.TIME:
        clock = value.split(".")[0]
    elif kind is MatchKind.DATETIME:
        clock = re.sub(r"[+-]\d{4}$", "", value).split(".")[0][8:]
    else:
        clock = ""
    if kind in (MatchKind.DATE, MatchKind.DATETIME):
        date = value[:8]
        if len(date) >= 6 and not 1 <= int(date[4:6]) <= 12:
            return False
        if len(date) == 8 and not 1 <= int(date[6:8]) <= 31:
            return False
    limits = (23, 59, 60)
    return all(
        int(clock[i : i + 2]) <= limit
        for i, limit in zip((0, 2, 4), limits, strict=True)
        if len(clock) > i
    )


def _upper_end(kind: MatchKind, value: str) -> str:
    """The last instant `value` covers at its precision: TM 0930 -> 093059.999999."""
    if kind is MatchKind.DATE:
        return value
    if kind is MatchKind.DATETIME:
        value = re.sub(r"[+-]\d{4}$", "", value)  # offsets are not compared
        template = _DT_MAX
    else:
        template = _TM_MAX
    if "." in value:
        whole, fraction = value.split(".")
        return f"{whole}.{fraction.ljust(6, '9')}"
    # Month 12 and day 31 are upper ends for a comparison as text, whatever the month.
    return value + template[len(value) :]


def _time_column(column: ColumnElement) -> ColumnElement:
    """Stored TM written as HH or HHMM compares as HH0000 / HHMM00."""
    return case(
        (func.length(column) < 6, func.substr(column + literal("0000"), 1, 6)),
        else_=column,
    )


def _is_single_dt_with_offset(kind: MatchKind, value: str) -> bool:
    """Whether a DT value's '-' starts a UTC offset (20200101120000-0500), not a range.

    Both read alike; an offset is at most 14 hours in quarter hours, while the 4-digit
    upper end of a range is a year (2020-2021), so the offset wins only when it can be one.
    """
    if kind is not MatchKind.DATETIME or not _DT.fullmatch(value):
        return False
    offset = re.search(r"[+-](\d{2})(\d{2})$", value)
    if offset is None or value.startswith("-") or "+" in value:
        return offset is not None
    return int(offset.group(1)) <= 14 and offset.group(2) in ("00", "15", "30", "45")


def _date_time_condition(kind: MatchKind, keyword: str, column, value: str) -> ColumnElement:
    stored = _time_column(column) if kind is MatchKind.TIME else column
    parts = [value] if _is_single_dt_with_offset(kind, value) else value.split("-")
    if len(parts) == 1:
        single = _normalise(kind, keyword, parts[0])
        if kind is MatchKind.DATE:
            return column == single
        lower = re.sub(r"[+-]\d{4}$", "", single)
        return and_(column != "", stored >= lower, stored <= _upper_end(kind, single))
    if len(parts) != 2 or not (parts[0] or parts[1]):
        raise UnprocessableQueryError(f"{keyword}: {value!r} is not a single value or range")
    conditions = [column != ""]
    if parts[0]:
        lower = re.sub(r"[+-]\d{4}$", "", _normalise(kind, keyword, parts[0]))
        conditions.append(stored >= lower)
    if parts[1]:
        conditions.append(stored <= _upper_end(kind, _normalise(kind, keyword, parts[1])))
    return and_(*conditions)


# --- reading the identifier --------------------------------------------------------------


def _values(element: DataElement) -> list[str]:
    """The element's values as stripped strings; [] when zero-length."""
    value = element.value
    if value is None or value == "":
        return []
    items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    texts = [str(item) for item in items if item is not None]
    parts = (part.strip() for text in texts for part in text.split("\\"))
    return [part for part in parts if part]


def _is_universal(values: list[str]) -> bool:
    return not values or all(set(v) <= {"*"} for v in values)


def _element(identifier: Dataset, tag: BaseTag) -> DataElement | None:
    try:
        return identifier.get(tag)
    except Exception as exc:  # pydicom defers decoding; a corrupt element raises here
        name = keyword_for_tag(tag) or str(tag)
        raise UnprocessableQueryError(f"cannot decode {name}", (int(tag),)) from exc


def _level_of(identifier: Dataset, model: QueryModel) -> Level:
    element = _element(identifier, _QUERY_LEVEL_TAG)
    values = _values(element) if element is not None else []
    if len(values) != 1:
        raise IdentifierMismatchError(
            "QueryRetrieveLevel missing or not single-valued", (int(_QUERY_LEVEL_TAG),)
        )
    try:
        level = Level[values[0].upper()]
    except KeyError:
        raise IdentifierMismatchError(
            f"QueryRetrieveLevel {values[0][:16]!r} is not valid", (int(_QUERY_LEVEL_TAG),)
        ) from None
    if model is QueryModel.STUDY_ROOT and level is Level.PATIENT:
        raise IdentifierMismatchError("Study Root has no PATIENT level", (int(_QUERY_LEVEL_TAG),))
    return level


def _check_hierarchy(identifier: Dataset, model: QueryModel, level: Level) -> None:
    """Unique keys above the query level: present, single value (or UID list), no wildcard.

    Only for hierarchical queries: a relational query may leave them out or match them
    like any other key."""
    top = Level.PATIENT if model is QueryModel.PATIENT_ROOT else Level.STUDY
    for above in Level:
        if not top <= above < level:
            continue
        keyword = UNIQUE_KEYS[above]
        tag = Tag(keyword)
        element = _element(identifier, tag)
        values = _values(element) if element is not None else []
        spec = _KEY_SPECS[keyword]
        if not values or any(not v or _has_wildcard(v) for v in values):
            raise IdentifierMismatchError(
                f"{level.name} query needs a {keyword} value", (int(tag),)
            )
        if len(values) > 1 and spec.kind is not MatchKind.UID:
            raise IdentifierMismatchError(f"{keyword} must be a single value", (int(tag),))


# --- building the statement --------------------------------------------------------------


def _text_condition(spec: KeySpec, column, values: list[str]) -> ColumnElement:
    conditions = []
    for value in values:
        if spec.kind is MatchKind.PERSON_NAME:
            conditions.append(_person_name_condition(column, value))
        elif _has_wildcard(value):
            conditions.append(_CaseSensitiveLike(column, value))
        else:
            conditions.append(column == value)
    return or_(*conditions)


def _person_name_condition(column, value: str) -> ColumnElement:
    """Case-insensitive for every script: the value, folded as storage.text folds, against
    the folded column (so `SMITH^A*` is a prefix match on an index). A query without '='
    matches the alphabetic group of a stored name."""
    groups = [group.rstrip("^ ") for group in fold_case(value).split("=")]
    pattern = "=".join(groups).rstrip("=")
    condition = _CaseSensitiveLike(column, pattern) if _has_wildcard(pattern) else column == pattern
    if "=" not in value and not pattern.endswith("*"):  # `...*` covers the groups too
        condition = or_(condition, _CaseSensitiveLike(column, pattern + "=*"))
    return condition


def _uid_condition(spec: KeySpec, column, values: list[str]) -> ColumnElement:
    return column.in_(values) if len(values) > 1 else column == values[0]


def _number_condition(spec: KeySpec, column, values: list[str]) -> ColumnElement:
    numbers = []
    for value in values:
        try:
            numbers.append(int(value))
        except ValueError:
            raise UnprocessableQueryError(
                f"{spec.keyword}: {value[:20]!r} is not an integer", (int(Tag(spec.keyword)),)
            ) from None
    return column.in_(numbers)


def _study_series_condition(values: list[str]) -> ColumnElement:
    series = _series.alias("match_series")
    wanted = _text_condition(
        KeySpec("Modality", Level.SERIES, MatchKind.TEXT), series.c.modality, values
    )
    return exists().where(series.c.study_pk == _study.c.id, wanted)


def _study_sop_class_condition(values: list[str]) -> ColumnElement:
    series = _series.alias("match_series")
    instance = _instance.alias("match_instance")
    return (
        exists()
        .where(series.c.study_pk == _study.c.id, instance.c.series_pk == series.c.id)
        .where(instance.c.sop_class_uid.in_(values))
    )


def _condition(spec: KeySpec, values: list[str]) -> ColumnElement | None:
    """The WHERE clause for one key, or None when the key cannot be matched on."""
    if spec.kind is MatchKind.MODALITIES:
        return _study_series_condition(values)
    if spec.kind is MatchKind.SOP_CLASSES:
        return _study_sop_class_condition(values)
    if spec.column is None:
        return None
    column = _LEVEL_TABLE[spec.level].c[spec.match_column or spec.column]
    if spec.kind in (MatchKind.TEXT, MatchKind.PERSON_NAME):
        return _text_condition(spec, column, values)
    if spec.kind is MatchKind.UID:
        return _uid_condition(spec, column, values)
    if spec.kind is MatchKind.NUMBER:
        return _number_condition(spec, column, values)
    conditions = [_date_time_condition(spec.kind, spec.keyword, column, v) for v in values]
    return or_(*conditions)


def _count(counted, *joins_and_filters) -> ColumnElement:
    return select(func.count(counted)).where(*joins_and_filters).scalar_subquery()


def _computed_column(keyword: str) -> ColumnElement:
    """A correlated aggregate answering one computed key for the row of the outer query."""
    st = _study.alias("agg_study")
    se = _series.alias("agg_series")
    inst = _instance.alias("agg_instance")
    if keyword == "NumberOfPatientRelatedStudies":
        return _count(st.c.id, st.c.patient_pk == _patient.c.id)
    if keyword == "NumberOfPatientRelatedSeries":
        return _count(se.c.id, se.c.study_pk == st.c.id, st.c.patient_pk == _patient.c.id)
    if keyword == "NumberOfPatientRelatedInstances":
        return _count(
            inst.c.id,
            inst.c.series_pk == se.c.id,
            se.c.study_pk == st.c.id,
            st.c.patient_pk == _patient.c.id,
        )
    if keyword == "NumberOfStudyRelatedSeries":
        return _count(se.c.id, se.c.study_pk == _study.c.id)
    if keyword == "NumberOfStudyRelatedInstances":
        return _count(inst.c.id, inst.c.series_pk == se.c.id, se.c.study_pk == _study.c.id)
    if keyword == "NumberOfSeriesRelatedInstances":
        return _count(inst.c.id, inst.c.series_pk == _series.c.id)
    if keyword == "ModalitiesInStudy":
        distinct = (
            select(se.c.modality.label("value"))
            .where(se.c.study_pk == _study.c.id, se.c.modality != "")
            .distinct()
            .correlate(_study)
            .subquery()
        )
    elif keyword == "SOPClassesInStudy":
        distinct = (
            select(inst.c.sop_class_uid.label("value"))
            .where(inst.c.series_pk == se.c.id, se.c.study_pk == _study.c.id)
            .distinct()
            .correlate(_study)
            .subquery()
        )
    else:
        raise KeyError(keyword)
    return select(func.aggregate_strings(distinct.c.value, "\\")).scalar_subquery()


def _from_clause(level: Level):
    joined = _patient
    if level >= Level.STUDY:
        joined = joined.join(_study, _study.c.patient_pk == _patient.c.id)
    if level >= Level.SERIES:
        joined = joined.join(_series, _series.c.study_pk == _study.c.id)
    if level >= Level.IMAGE:
        joined = joined.join(_instance, _instance.c.series_pk == _series.c.id)
    return joined


# --- any other attribute: instance_attribute --------------------------------------------

_TIME_KINDS = {"DA": MatchKind.DATE, "TM": MatchKind.TIME, "DT": MatchKind.DATETIME}
_BINARY_NUMBERS = {"US": int, "SS": int, "UL": int, "SL": int, "UV": int, "SV": int,
                   "FL": float, "FD": float}  # fmt: skip


def attribute_vr(element: DataElement) -> str:
    """The VR an instance_attribute key is matched and returned with."""
    try:
        return dictionary_VR(element.tag).split(" or ")[0]
    except KeyError:
        vr = str(element.VR or "")
        return vr if vr and vr != "UN" and " or " not in vr else "LO"


def _attribute_scope(level: Level, attribute) -> list[ColumnElement]:
    """Clauses tying instance_attribute rows to the outer row of `level`: at STUDY and
    SERIES level (and PATIENT) the values of any of its instances, as Orthanc does."""
    if level is Level.IMAGE:
        return [attribute.c.instance_pk == _instance.c.id]
    inst = _instance.alias("attr_instance")
    clauses = [attribute.c.instance_pk == inst.c.id]
    if level is Level.SERIES:
        return [*clauses, inst.c.series_pk == _series.c.id]
    se = _series.alias("attr_series")
    clauses += [inst.c.series_pk == se.c.id]
    if level is Level.STUDY:
        return [*clauses, se.c.study_pk == _study.c.id]
    st = _study.alias("attr_study")
    return [*clauses, se.c.study_pk == st.c.id, st.c.patient_pk == _patient.c.id]


def _tag_is(attribute, tag: int) -> ColumnElement:
    """`tag = ?` written so that no index led by tag can serve it: the planner then reaches
    the attribute rows through the outer row's instances (the (instance_pk, tag) index), a
    few dozen rows each. Led by a (tag, value) index instead (older indexes have one),
    SQLite scans every row of the tag for every outer row: 20,000 series asking for
    BitsStored took minutes."""
    return attribute.c.tag + 0 == tag


def _attribute_condition(element: DataElement, level: Level, values: list[str]) -> ColumnElement:
    """Some instance of the row's level holds a value of this attribute that matches."""
    keyword = element.keyword or str(element.tag)
    vr = attribute_vr(element)
    attribute = _attribute.alias("match_attribute")
    if vr == "PN":
        wanted = or_(*(_person_name_condition(attribute.c.folded, v) for v in values))
    elif vr in _TIME_KINDS:
        wanted = or_(
            *(_date_time_condition(_TIME_KINDS[vr], keyword, attribute.c.value, v) for v in values)
        )
    elif vr == "UI":
        wanted = attribute.c.value.in_(values)
    else:
        spec = KeySpec(keyword, level, MatchKind.TEXT)
        wanted = _text_condition(spec, attribute.c.value, values)
    return exists().where(
        _tag_is(attribute, int(element.tag)), *_attribute_scope(level, attribute), wanted
    )


def _attribute_column(element: DataElement, level: Level) -> ColumnElement:
    """The values of the first instance (of the row's level) that holds the attribute,
    joined with backslashes."""
    tag = int(element.tag)
    holder = _attribute.alias("first_holder")
    first = (
        select(func.min(holder.c.instance_pk))
        .where(_tag_is(holder, tag), *_attribute_scope(level, holder))
        .correlate(_patient, _study, _series, _instance)  # the outer row, two levels up
        .scalar_subquery()
    )
    value = _attribute.alias("attribute_value")
    return (
        select(func.aggregate_strings(value.c.value, "\\"))
        .where(value.c.instance_pk == first, value.c.tag == tag)
        .scalar_subquery()
    )


def _attribute_element(element: DataElement, raw: object) -> DataElement:
    vr = attribute_vr(element)
    if raw is None or raw == "":
        return DataElement(element.tag, vr, None)
    values: list = str(raw).split("\\")
    convert = _BINARY_NUMBERS.get(vr)
    if convert is not None:
        try:
            values = [convert(v) for v in values]
        except ValueError:
            return DataElement(element.tag, vr, None)
    return DataElement(element.tag, vr, values if len(values) > 1 else values[0])


# --- response values ---------------------------------------------------------------------


def _response_value(spec: KeySpec, raw: object) -> object:
    if raw is None or raw == "":
        return None
    if spec.kind in (MatchKind.MODALITIES, MatchKind.SOP_CLASSES):
        return sorted(set(str(raw).split("\\")))
    return raw


def empty_element_vr(element: DataElement) -> str:
    """The VR a requested key the node returns zero-length is written with."""
    vr = element.VR
    if vr is None or " or " in str(vr):
        try:
            vr = dictionary_VR(element.tag).split(" or ")[0]
        except KeyError:
            vr = "UN"
    return str(vr)


def _empty_element(element: DataElement) -> DataElement:
    """The requested element, zero-length (an empty sequence for SQ)."""
    vr = empty_element_vr(element)
    if vr == "SQ":
        return DataElement(element.tag, "SQ", Sequence())
    return DataElement(element.tag, vr, None)


def _needs_utf8(value: object) -> bool:
    if isinstance(value, str):
        return not value.isascii()
    if isinstance(value, list):
        return any(_needs_utf8(v) for v in value)
    return False


@dataclass(frozen=True)
class _ReturnKey:
    element: DataElement  # the requested element (tag, VR)
    spec: KeySpec | None  # None: an attribute (if labelled) or returned zero-length
    label: str | None  # column label in the statement


@dataclass(frozen=True)
class PreparedFind:
    """One C-FIND turned into SQL; iterate `responses` to stream the matches."""

    model: QueryModel
    level: Level
    statement: Select
    return_keys: tuple[_ReturnKey, ...]
    ignored_keys: tuple[str, ...]  # non-empty keys not used for matching (-> 0xFF01)
    requested_charset: tuple[str, ...]

    def responses(self, conn: Connection, retrieve_ae_title: str) -> Iterator[Dataset]:
        """Yield one response identifier per match, streaming rows from the database."""
        result = conn.execution_options(yield_per=256).execute(self.statement)
        for row in result:
            yield self._identifier(row._mapping, retrieve_ae_title)

    def encoded_responses(
        self, conn: Connection, retrieve_ae_title: str, *, implicit_vr: bool
    ) -> Iterator[bytes]:
        """The identifiers of `responses`, already encoded in a Little Endian transfer
        syntax (storage.find_rows): the same bytes, without a Dataset per match."""
        encode = IdentifierEncoder(self, retrieve_ae_title, implicit_vr=implicit_vr).encode
        result = conn.execution_options(yield_per=1024).execute(self.statement)
        for partition in result.partitions():
            for row in partition:
                yield encode(row)

    def limited(self, max_results: int) -> PreparedFind:
        """The same query that stops after `max_results` + 1 matches: one more than may be
        sent, so that the caller learns whether the limit cut the answer short."""
        if max_results <= 0:
            return self
        return replace(self, statement=self.statement.limit(max_results + 1))

    def _identifier(self, row, retrieve_ae_title: str) -> Dataset:
        ds = Dataset()
        needs_utf8 = False
        for key in self.return_keys:
            if key.spec is None and key.label is not None:
                attribute = _attribute_element(key.element, row[key.label])
                needs_utf8 = needs_utf8 or _needs_utf8(attribute.value)
                ds.add(attribute)
                continue
            if key.spec is None:
                ds.add(_empty_element(key.element))
                continue
            value = _response_value(key.spec, row[key.label])
            needs_utf8 = needs_utf8 or _needs_utf8(value)
            vr = dictionary_VR(key.element.tag)
            ds.add(DataElement(key.element.tag, vr, value))
        ds.QueryRetrieveLevel = self.level.name
        ds.RetrieveAETitle = retrieve_ae_title
        if needs_utf8:
            ds.SpecificCharacterSet = UTF8_CHARSET
        elif self.requested_charset:
            ds.SpecificCharacterSet = list(self.requested_charset)
        return ds


def prepare_find(
    identifier: Dataset, model: QueryModel, *, relational: bool = True
) -> PreparedFind:
    """Validate `identifier` for `model` and build its single SQL statement.

    `relational` answers queries without the unique keys above their level (PS3.4
    C.4.1.2.2); otherwise the hierarchical rules apply. Raises IdentifierMismatchError or
    UnprocessableQueryError (both QueryError).
    """
    level = _level_of(identifier, model)
    if not relational:
        _check_hierarchy(identifier, model, level)
    level_table = _LEVEL_TABLE[level]
    columns: list[ColumnElement] = []
    conditions: list[ColumnElement] = []
    return_keys: list[_ReturnKey] = []
    ignored: list[str] = []
    requested_charset: tuple[str, ...] = ()
    for tag in list(identifier.keys()):
        if tag.group < 0x0008 or tag.element == 0x0000:
            continue  # command, file meta and group length elements are not keys
        element = _element(identifier, tag)
        if tag == _CHARSET_TAG:
            requested_charset = tuple(_values(element))
            continue
        if tag in _SCP_FILLED:
            continue
        keyword = element.keyword or str(tag)
        spec = _KEY_SPECS.get(keyword)
        if spec is None and element.VR != "SQ":
            values = _values(element)
            if not _is_universal(values):
                try:
                    conditions.append(_attribute_condition(element, level, values))
                except QueryError as exc:
                    exc.offending = exc.offending or (int(tag),)
                    raise
            label = f"a_{int(tag):08X}"
            columns.append(_attribute_column(element, level).label(label))
            return_keys.append(_ReturnKey(element, None, label))
            continue
        if element.VR == "SQ" or spec is None or spec.level > level:
            if not _unsupported_is_universal(element):
                ignored.append(keyword)
            return_keys.append(_ReturnKey(element, None, None))
            continue
        values = _values(element)
        if not _is_universal(values):
            try:
                condition = _condition(spec, values)
            except QueryError as exc:
                exc.offending = exc.offending or (int(tag),)
                raise
            if condition is None:
                ignored.append(keyword)
            else:
                conditions.append(condition)
        label = f"k_{keyword}"
        if spec.column is not None:
            columns.append(_LEVEL_TABLE[spec.level].c[spec.column].label(label))
        else:
            columns.append(_computed_column(keyword).label(label))
        return_keys.append(_ReturnKey(element, spec, label))

    statement = (
        select(*columns, level_table.c.id.label("_pk"))
        .select_from(_from_clause(level))
        .where(*conditions)
        .order_by(level_table.c.id)
    )
    return PreparedFind(
        model=model,
        level=level,
        statement=statement,
        return_keys=tuple(return_keys),
        ignored_keys=tuple(ignored),
        requested_charset=requested_charset,
    )


def _unsupported_is_universal(element: DataElement) -> bool:
    """Whether a key the node does not match on asks for nothing (so ignoring it is exact).

    A sequence with items asks for sequence matching, which the index cannot do.
    """
    if element.VR == "SQ":
        return not element.value
    try:
        return _is_universal(_values(element))
    except Exception:
        return False


def find(
    engine: Engine, identifier: Dataset, model: QueryModel, retrieve_ae_title: str
) -> Iterator[Dataset]:
    """Convenience: prepare and stream the matches of one identifier on a fresh connection."""
    prepared = prepare_find(identifier, model)
    with engine.connect() as conn:
        yield from prepared.responses(conn, retrieve_ae_title)


# --- retrieve ----------------------------------------------------------------------------


def retrieve_instances(
    conn: Connection, identifier: Dataset, model: QueryModel, *, relational: bool = True
) -> list:
    """The instances a C-MOVE or C-GET identifier selects: what C-FIND matches at the
    identifier's level, then every instance under each match, in study, series and instance
    order. Rows have sop_instance_uid, sop_class_uid, transfer_syntax_uid and file_path.

    The unique key of the level itself must hold a value or a list of UIDs (PS3.4 C.4.2.2.1),
    so that a retrieve never means "everything". `relational` as for `prepare_find` (PS3.4
    C.4.2.2.1.2 relational retrieve). Raises QueryError as `prepare_find` does.
    """
    prepared = prepare_find(identifier, model, relational=relational)
    keyword = UNIQUE_KEYS[prepared.level]
    element = _element(identifier, Tag(keyword))
    values = _values(element) if element is not None else []
    if _is_universal(values) or any(_has_wildcard(value) for value in values):
        raise IdentifierMismatchError(f"a retrieve needs a {keyword} value", (int(Tag(keyword)),))
    level_table = _LEVEL_TABLE[prepared.level]
    matched = prepared.statement.with_only_columns(level_table.c.id).order_by(None)
    statement = (
        select(
            _instance.c.sop_instance_uid,
            _instance.c.sop_class_uid,
            _instance.c.transfer_syntax_uid,
            _instance.c.file_path,
        )
        .select_from(_from_clause(Level.IMAGE))
        .where(level_table.c.id.in_(matched))
        .order_by(_study.c.id, _series.c.id, _instance.c.instance_number, _instance.c.id)
    )
    return list(conn.execute(statement).all())
