"""Turn a dataset's header into index rows: the patient/study/series/instance upsert.

Only header attributes are read (the caller parses with stop_before_pixels), so indexing
never decodes pixel data. A later copy of the same entity updates the stored attributes:
the newest information a sender gave wins, as in most PACS.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.values import convert_value
from sqlalchemy import (
    Connection,
    Dialect,
    Insert,
    Select,
    Table,
    Update,
    bindparam,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from storage.driver_statements import driver_statement
from storage.errors import IdentityConflictError
from storage.models import Instance, InstanceAttribute, Patient, Series, Study
from storage.text import fold_case


def _text(values: Mapping[str, object], keyword: str) -> str:
    """The attribute as text ('' when absent or empty); multi-values joined by backslash."""
    value = values.get(keyword)
    if value is None or value == "":
        return ""
    if isinstance(value, list | tuple | MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _person_name(values: Mapping[str, object], keyword: str) -> str:
    """A PN without its trailing empty components, so DOE^JOHN^^ matches DOE^JOHN."""
    return "=".join(group.rstrip("^") for group in _text(values, keyword).split("="))


def _number(values: Mapping[str, object], keyword: str) -> int | None:
    """An IS/US attribute as int, or None when absent, empty or not a number."""
    value = values.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class HeaderRecord:
    """What the index keeps of one instance, read once from its header."""

    patient_id: str
    patient_name: str
    patient_name_folded: str
    patient_birth_date: str
    patient_sex: str
    study_instance_uid: str
    study_date: str
    study_time: str
    accession_number: str
    study_id: str
    study_description: str
    referring_physician_name: str
    referring_physician_name_folded: str
    series_instance_uid: str
    modality: str
    series_number: int | None
    series_description: str
    body_part_examined: str
    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int | None
    transfer_syntax_uid: str
    rows: int | None
    columns: int | None
    number_of_frames: int | None
    samples_per_pixel: int | None
    photometric_interpretation: str
    acquisition_date_time: str
    specific_character_set: str
    # (tag, VR, position, value, folded) of the other top-level attributes (instance_attribute)
    attributes: tuple[tuple[int, str, int, str, str | None], ...] = ()

    @classmethod
    def from_dataset(cls, ds: Dataset, transfer_syntax_uid: str) -> HeaderRecord:
        """The record of `ds`'s top level, each element's value converted once."""
        values, attributes = _column_values(ds)
        patient_name = _person_name(values, "PatientName")
        referring = _person_name(values, "ReferringPhysicianName")
        return cls(
            patient_id=_text(values, "PatientID"),
            patient_name=patient_name,
            patient_name_folded=fold_case(patient_name),
            patient_birth_date=_text(values, "PatientBirthDate"),
            patient_sex=_text(values, "PatientSex"),
            study_instance_uid=_text(values, "StudyInstanceUID"),
            study_date=_text(values, "StudyDate"),
            study_time=_text(values, "StudyTime").replace(":", ""),
            accession_number=_text(values, "AccessionNumber"),
            study_id=_text(values, "StudyID"),
            study_description=_text(values, "StudyDescription"),
            referring_physician_name=referring,
            referring_physician_name_folded=fold_case(referring),
            series_instance_uid=_text(values, "SeriesInstanceUID"),
            modality=_text(values, "Modality"),
            series_number=_number(values, "SeriesNumber"),
            series_description=_text(values, "SeriesDescription"),
            body_part_examined=_text(values, "BodyPartExamined").upper(),
            sop_instance_uid=_text(values, "SOPInstanceUID"),
            sop_class_uid=_text(values, "SOPClassUID"),
            instance_number=_number(values, "InstanceNumber"),
            transfer_syntax_uid=transfer_syntax_uid,
            rows=_number(values, "Rows"),
            columns=_number(values, "Columns"),
            number_of_frames=_number(values, "NumberOfFrames"),
            samples_per_pixel=_number(values, "SamplesPerPixel"),
            photometric_interpretation=_text(values, "PhotometricInterpretation"),
            acquisition_date_time=_text(values, "AcquisitionDateTime"),
            specific_character_set=_text(values, "SpecificCharacterSet"),
            attributes=attributes,
        )


# The keywords the patient/study/series/instance columns hold; every other top-level
# attribute with a value goes to instance_attribute.
COLUMN_KEYWORDS = frozenset(
    {
        "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
        "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription",
        "ReferringPhysicianName", "SeriesInstanceUID", "Modality", "SeriesNumber",
        "SeriesDescription", "BodyPartExamined", "SOPInstanceUID", "SOPClassUID",
        "InstanceNumber", "Rows", "Columns", "NumberOfFrames", "SamplesPerPixel",
        "PhotometricInterpretation", "AcquisitionDateTime", "SpecificCharacterSet",
    }
)  # fmt: skip
_COLUMN_TAGS = {int(tag_for_keyword(keyword) or 0): keyword for keyword in COLUMN_KEYWORDS}
# Not kept as attributes: sequences and bulk data (the file has them).
_NOT_ATTRIBUTE_VRS = frozenset({"SQ", "OB", "OD", "OF", "OL", "OV", "OW", "UN"})
MAX_ATTRIBUTE_VALUE = 1024
_INSERT_ATTRIBUTE = insert(InstanceAttribute)
_ATTRIBUTE_COLUMNS = ("instance_pk", "tag", "vr", "position", "value", "folded")
_DELETE_ATTRIBUTES = delete(InstanceAttribute).where(
    InstanceAttribute.instance_pk == bindparam("pk")
)


def _as_text(item: object) -> str:
    """A value as the sender wrote it (a DS keeps its digits, not a float's repr)."""
    if item is None:
        return ""
    original = getattr(item, "original_string", None)
    return str(original if original is not None else item).strip()


def _attribute_rows(
    tag: int, vr: str, value: object
) -> Iterator[tuple[int, str, int, str, str | None]]:
    """(tag, VR, position, value, folded) for each value of one attribute; values as DICOM
    text, person names also case-folded."""
    if value is None or value == "":
        return
    items = value if isinstance(value, list | tuple | MultiValue) else (value,)
    for position, item in enumerate(items):
        text = _as_text(item)
        if text and len(text) <= MAX_ATTRIBUTE_VALUE:
            yield tag, vr, position, text, fold_case(text) if vr == "PN" else None


# VRs whose encoded value pydicom converts with nothing but the data set's character set:
# not the ambiguous ones ("US or SS", which another element decides), sequences or bulk data.
_PLAIN_VRS = frozenset(
    {
        "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "PN", "SH",
        "SL", "SS", "ST", "TM", "UC", "UI", "UL", "UR", "US", "UT",
    }
)  # fmt: skip


def _plain_vr(element: RawDataElement) -> str | None:
    """The VR pydicom gives a raw element when it is one of _PLAIN_VRS, else None (then
    pydicom's own item access decides, as for a private tag in implicit VR)."""
    vr = element.VR
    if vr is None:
        if element.tag >> 16 & 1:
            return None
        try:
            vr = dictionary_VR(element.tag)
        except KeyError:
            return None
    return vr if vr in _PLAIN_VRS else None


def _top_level(ds: Dataset) -> Iterator[tuple[int, str, object]]:
    """(tag, VR, value) of each top-level element, the value as pydicom converts it.

    A raw element of a plain VR goes straight through pydicom's `convert_value` with the
    character set read once; item access (`ds[tag]`) would look the character set up
    again for every element, three nested lookups each, which made up about half the time
    of indexing a header. Any other element, or one `convert_value` refuses, is read by
    item access, as before.
    """
    try:
        charset = ds.get("SpecificCharacterSet")
        encodings: str | list[str] | None = (
            convert_encodings(charset) if charset else default_encoding
        )
    except Exception:  # item access raises it, or copes, element by element
        encodings = None
    for tag in sorted(ds.keys()):
        element = ds.get_item(tag)
        if isinstance(element, RawDataElement) and encodings is not None:
            vr = _plain_vr(element)
            if vr is not None:
                try:
                    yield int(tag), vr, convert_value(vr, element, encodings)
                    continue
                except Exception:  # item access below says what is wrong
                    pass
        converted = ds[tag]
        yield int(tag), str(converted.VR), converted.value


def _column_values(
    ds: Dataset,
) -> tuple[dict[str, object], tuple[tuple[int, str, int, str, str | None], ...]]:
    """One walk over the top level: the values of the column attributes by keyword, and
    the instance_attribute rows of every other attribute with a value."""
    columns: dict[str, object] = {}
    rows: list[tuple[int, str, int, str, str | None]] = []
    for tag, vr, value in _top_level(ds):
        keyword = _COLUMN_TAGS.get(tag)
        if keyword is not None:
            columns[keyword] = value
            continue
        if tag >> 16 in (0x0002, 0x7FE0) or tag & 0xFFFF == 0:
            continue
        if vr in _NOT_ATTRIBUTE_VRS:
            continue
        rows.extend(_attribute_rows(tag, vr, value))
    return columns, tuple(rows)


_PATIENT_FIELDS = ("patient_name", "patient_name_folded", "patient_birth_date", "patient_sex")
_STUDY_FIELDS = (
    "study_date",
    "study_time",
    "accession_number",
    "study_id",
    "study_description",
    "referring_physician_name",
    "referring_physician_name_folded",
)
_SERIES_FIELDS = ("modality", "series_number", "series_description", "body_part_examined")
_INSTANCE_FIELDS = (
    "sop_class_uid",
    "instance_number",
    "transfer_syntax_uid",
    "rows",
    "columns",
    "number_of_frames",
    "samples_per_pixel",
    "photometric_interpretation",
    "acquisition_date_time",
    "specific_character_set",
)


# Statements are built once and take their values as parameters: building a statement
# with literal values costs SQLAlchemy a new cache key per call, more than running it.
@functools.cache
def _select_pk(table: Table, key_column: str, parent_column: str | None) -> Select:
    columns = [table.c.id] + ([table.c[parent_column]] if parent_column else [])
    return select(*columns).where(table.c[key_column] == bindparam("key"))


@functools.cache
def _select_instance_path() -> Select:
    table = Instance.__table__
    return select(table.c.id, table.c.file_path).where(table.c.sop_instance_uid == bindparam("key"))


@functools.cache
def _update_by_pk(table: Table) -> Update:
    return update(table).where(table.c.id == bindparam("pk_"))


# The dialects whose INSERT can skip a row whose unique key exists (ON CONFLICT DO NOTHING).
_INSERT_IF_ABSENT = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}


def insert_if_absent(dialect: Dialect, table: Table, key_column: str) -> Insert | None:
    """An INSERT that adds nothing when a row with the same `key_column` exists, or None
    where the database cannot say so in one statement: then look, then insert.

    Most instances arrive with their patient, study and series unknown (a chest X-ray is
    often the only image of its study), so inserting first saves a look per row. With
    `RETURNING id` (SQLite 3.35+, PostgreSQL) no row back means the key existed.
    """
    make = _INSERT_IF_ABSENT.get(dialect.name)
    if make is None or not dialect.insert_returning:
        return None
    return _cached_insert_if_absent(make, table, key_column)


@functools.cache
def _cached_insert_if_absent(make: Callable[[Table], Any], table: Table, key_column: str) -> Insert:
    return make(table).on_conflict_do_nothing(index_elements=[key_column]).returning(table.c.id)


def _add(conn: Connection, table: Table, key_column: str, row: dict[str, object]) -> int | None:
    """Insert `row` unless a row with its `key_column` exists: the new row's primary key,
    or None when the key existed (and nothing was written)."""
    statement = insert_if_absent(conn.dialect, table, key_column)
    if statement is not None:
        on_driver = driver_statement(statement, conn.dialect, row)
        if on_driver is not None:
            added = on_driver.first(conn, row)
        else:
            added = conn.execute(statement, row).first()
        return None if added is None else added[0]
    if conn.execute(_select_pk(table, key_column, None), {"key": row[key_column]}).first():
        return None
    return conn.execute(insert(table), row).inserted_primary_key[0]


class IndexWriter:
    """Upserts index rows with SQL Core statements and a cache of known parent rows.

    The ORM costs a few milliseconds per instance, more than the fsyncs; a study of a
    hundred images would look up and rewrite the same patient, study and series rows a
    hundred times. Rows are never deleted, so a cached (key -> primary key, attributes) is
    safe; it is updated only after the caller's transaction commits.
    """

    def __init__(self, refuse_conflicts: bool = True) -> None:
        self._cache: dict[tuple[str, str], tuple[int, tuple]] = {}
        self._pending: dict[tuple[str, str], tuple[int, tuple]] = {}
        # A study held under another patient, or a series under another study: refused
        # (IdentityConflictError), or accepted and reported by `upsert`.
        self.refuse_conflicts = refuse_conflicts

    def committed(self) -> None:
        self._cache.update(self._pending)
        self._pending.clear()

    def rolled_back(self) -> None:
        self._pending.clear()

    def _upsert_parent(
        self,
        conn: Connection,
        table: Table,
        key_column: str,
        key: str,
        values: dict[str, object],
        parent: tuple[str, int] | None,
        conflicts: list[IdentityConflictError],
    ) -> int:
        """Primary key of the row whose `key_column` is `key`, inserted or updated.

        A row that exists under another parent is a conflict: raised when conflicts are
        refused, else appended to `conflicts` and the row moved to the new parent.
        """
        if parent is not None:
            values = {**values, parent[0]: parent[1]}
        attributes = tuple(values.values())
        cache_key = (table.name, key)
        cached = self._pending.get(cache_key) or self._cache.get(cache_key)
        if cached is not None and cached[1] == attributes:
            return cached[0]
        parent_column = parent[0] if parent is not None else None
        pk = _add(conn, table, key_column, {key_column: key, **values})
        if pk is None:
            lookup = _select_pk(table, key_column, parent_column)
            existing = conn.execute(lookup, {"key": key}).one()
            pk = existing[0]
            if parent is not None and existing[1] != parent[1]:
                conflict = IdentityConflictError(table.name, key)
                if self.refuse_conflicts:
                    raise conflict
                conflicts.append(conflict)
            conn.execute(_update_by_pk(table), {"pk_": pk, **values})
        self._pending[cache_key] = (pk, attributes)
        return pk

    def upsert(
        self,
        conn: Connection,
        record: HeaderRecord,
        *,
        file_path: str,
        file_size: int,
        received_at: datetime,
        calling_ae: str,
        is_result: bool,
        file_sha256: str | None = None,
        conflicts: list[IdentityConflictError] | None = None,
    ) -> str | None:
        """Insert or update the four rows for `record` (the caller commits).

        Returns the file path the instance had before, or None if it is new. Identity
        conflicts accepted on the way are appended to `conflicts`.
        """
        fields = record.__dict__
        conflicts = conflicts if conflicts is not None else []
        patient_pk = self._upsert_parent(
            conn,
            Patient.__table__,
            "patient_id",
            record.patient_id,
            {f: fields[f] for f in _PATIENT_FIELDS},
            None,
            conflicts,
        )
        study_pk = self._upsert_parent(
            conn,
            Study.__table__,
            "study_instance_uid",
            record.study_instance_uid,
            {f: fields[f] for f in _STUDY_FIELDS},
            ("patient_pk", patient_pk),
            conflicts,
        )
        series_pk = self._upsert_parent(
            conn,
            Series.__table__,
            "series_instance_uid",
            record.series_instance_uid,
            {f: fields[f] for f in _SERIES_FIELDS},
            ("study_pk", study_pk),
            conflicts,
        )
        instances = Instance.__table__
        values = {f: fields[f] for f in _INSTANCE_FIELDS} | {
            "series_pk": series_pk,
            "file_path": file_path,
            "file_size": file_size,
            "file_sha256": file_sha256,
            "received_at": received_at,
            "calling_ae": calling_ae,
            "is_result": is_result,
        }
        sop = record.sop_instance_uid
        added = _add(conn, instances, "sop_instance_uid", {"sop_instance_uid": sop, **values})
        if added is not None:
            self._write_attributes(conn, added, record, replace=False)
            return None
        previous = conn.execute(_select_instance_path(), {"key": sop}).one()
        conn.execute(_update_by_pk(instances), {"pk_": previous.id, **values})
        self._write_attributes(conn, previous.id, record, replace=True)
        return previous.file_path

    @staticmethod
    def _write_attributes(
        conn: Connection, instance_pk: int, record: HeaderRecord, replace: bool
    ) -> None:
        if replace:
            conn.execute(_DELETE_ATTRIBUTES, {"pk": instance_pk})
        if record.attributes:
            rows = [
                {
                    "instance_pk": instance_pk,
                    "tag": tag,
                    "vr": vr,
                    "position": position,
                    "value": value,
                    "folded": folded,
                }
                for tag, vr, position, value, folded in record.attributes
            ]
            on_driver = driver_statement(_INSERT_ATTRIBUTE, conn.dialect, _ATTRIBUTE_COLUMNS)
            if on_driver is not None:
                on_driver.execute_many(conn, rows)
            else:
                conn.execute(_INSERT_ATTRIBUTE, rows)

