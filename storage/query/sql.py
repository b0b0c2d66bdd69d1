"""A find request as one SQL statement over the index (patient, study, series, instance,
instance_attribute).

`prepare` turns a FindRequest into a `PreparedFind`: the statement, and for each key of
the response the column it is read from. Matching follows storage.query.matching: text is
case-sensitive (storage.query.like), person names are matched case-folded on an indexed
folded column, TM values stored with fewer digits (`09`, `0930`) compare as if padded with
zeros, several values of a non-UID key match if any value matches (PS3.4 C.2.2.2.8).
Counts, ModalitiesInStudy and SOPClassesInStudy are correlated SQL aggregates inside the
same statement, and so are the attributes outside the index columns (instance_attribute),
so one find is one query whatever it asks for. A key the index cannot match (see
storage.query.keys) is left out of the WHERE clause and named in `ignored_keys`, so that
the caller can say the filter was not applied (C-FIND: Pending 0xFF01).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pydicom.datadict import tag_for_keyword
from sqlalchemy import (
    Boolean,
    ColumnElement,
    Select,
    and_,
    case,
    exists,
    func,
    literal,
    or_,
    select,
    type_coerce,
)
from sqlalchemy.sql.elements import Grouping

from storage.models import Instance, InstanceAttribute, Patient, Series, Study
from storage.query.errors import QueryError
from storage.query.keys import KeyRole, KeySpec, QueryKey, attribute_vr, key_role
from storage.query.like import CaseSensitiveLike
from storage.query.matching import (
    MatchKind,
    attribute_kind,
    has_wildcard,
    integers,
    person_name_patterns,
    time_bounds,
)
from storage.query.model import Level
from storage.query.request import FindRequest

_patient = Patient.__table__
_study = Study.__table__
_series = Series.__table__
_instance = Instance.__table__
_attribute = InstanceAttribute.__table__
LEVEL_TABLE = {
    Level.PATIENT: _patient,
    Level.STUDY: _study,
    Level.SERIES: _series,
    Level.IMAGE: _instance,
}


@dataclass(frozen=True)
class ReturnKey:
    """One key of the response and where its value comes from."""

    key: QueryKey
    spec: KeySpec | None  # None: an attribute (if labelled) or returned zero-length
    label: str | None  # column label in the statement; None: returned zero-length


@dataclass(frozen=True)
class PreparedFind:
    """One find turned into SQL; storage.query.encode_dimse streams its matches."""

    request: FindRequest
    statement: Select
    return_keys: tuple[ReturnKey, ...]
    ignored_keys: tuple[str, ...]  # non-empty keys not used for matching (-> 0xFF01)

    @property
    def level(self) -> Level:
        return self.request.level

    def limited(self, max_results: int) -> PreparedFind:
        """The same query that stops after `max_results` + 1 matches: one more than may be
        sent, so that the caller learns whether the limit cut the answer short."""
        if max_results <= 0:
            return self
        return replace(self, statement=self.statement.limit(max_results + 1))


def prepare(request: FindRequest) -> PreparedFind:
    """The single SQL statement that answers `request`. Raises UnprocessableQueryError for
    a value that cannot be matched (the request constructors have checked that already)."""
    level = request.level
    level_table = LEVEL_TABLE[level]
    columns: list[ColumnElement] = []
    conditions: list[ColumnElement] = []
    return_keys: list[ReturnKey] = []
    ignored: list[str] = []
    for key in request.keys:
        role, spec = key_role(key, level)
        if role is KeyRole.ATTRIBUTE:
            if not key.is_universal:
                conditions.append(_key_condition(key, None, level))
            label = f"a_{key.tag:08X}"
            columns.append(_attribute_column(key.tag, level).label(label))
            return_keys.append(ReturnKey(key, None, label))
            continue
        if role is KeyRole.UNSUPPORTED or spec is None:
            if not key.is_universal:
                ignored.append(key.keyword)
            return_keys.append(ReturnKey(key, None, None))
            continue
        if not key.is_universal:
            condition = _key_condition(key, spec, level)
            if condition is None:
                ignored.append(key.keyword)
            else:
                conditions.append(condition)
        label = f"k_{key.keyword}"
        if spec.column is not None:
            columns.append(LEVEL_TABLE[spec.level].c[spec.column].label(label))
        else:
            columns.append(_computed_column(key.keyword).label(label))
        return_keys.append(ReturnKey(key, spec, label))

    statement = (
        select(*columns, level_table.c.id.label("_pk"))
        .select_from(from_clause(level))
        .where(*conditions)
        .order_by(level_table.c.id)
    )
    return PreparedFind(request, statement, tuple(return_keys), tuple(ignored))


def _key_condition(key: QueryKey, spec: KeySpec | None, level: Level) -> ColumnElement | None:
    """The WHERE clause of one key: an index key's (None when it cannot be matched on), or
    an attribute's (no spec). A QueryError raised names the key's tag."""
    try:
        if spec is None:
            return _attribute_condition(key, level)
        return _condition(spec, list(key.values))
    except QueryError as exc:
        exc.offending = exc.offending or (key.tag,)
        raise


# --- conditions --------------------------------------------------------------------------


def _date_time_condition(kind: MatchKind, keyword: str, column, value: str) -> ColumnElement:
    bounds = time_bounds(kind, keyword, value)
    if bounds.equal is not None:
        return column == bounds.equal
    stored = _time_column(column) if kind is MatchKind.TIME else column
    conditions = [column != ""]
    if bounds.lower is not None:
        conditions.append(stored >= bounds.lower)
    if bounds.upper is not None:
        conditions.append(stored <= bounds.upper)
    return and_(*conditions)


def _time_column(column: ColumnElement) -> ColumnElement:
    """Stored TM written as HH or HHMM compares as HH0000 / HHMM00."""
    return case(
        (func.length(column) < 6, func.substr(column + literal("0000"), 1, 6)),
        else_=column,
    )


def _text_condition(spec: KeySpec, column, values: list[str]) -> ColumnElement:
    """Exact values as one `IN` list (a list of thousands stays one shallow expression),
    each value with a wildcard as its own LIKE (storage.query.matching limits how many)."""
    if spec.kind is MatchKind.PERSON_NAME:
        return _person_names_condition(column, values)
    exact = [value for value in values if not has_wildcard(value)]
    conditions = [CaseSensitiveLike(column, value) for value in values if has_wildcard(value)]
    if exact:
        conditions.append(column.in_(exact) if len(exact) > 1 else column == exact[0])
    return any_of(conditions)


def _person_names_condition(column, values: list[str]) -> ColumnElement:
    """One clause per name (the folded column has no portable "alphabetic group" to put
    in an IN list), OR-ed as a balanced tree so that thousands of names stay shallow."""
    return any_of([_person_name_condition(column, value) for value in values])


# Clauses per OR group: "a OR b OR c ..." nests one level per term in SQLite's parse tree
# (at most 1,000 deep); groups of groups keep thousands of terms a few dozen deep.
OR_GROUP = 32


def any_of(conditions: list[ColumnElement]) -> ColumnElement:
    """OR of `conditions`, parenthesised in groups of OR_GROUP, groups of groups, ..."""
    while len(conditions) > OR_GROUP:
        conditions = [
            # type_coerce: SQLAlchemy would flatten a bare OR inside an OR back into one.
            Grouping(type_coerce(or_(*conditions[i : i + OR_GROUP]), Boolean))
            for i in range(0, len(conditions), OR_GROUP)
        ]
    return or_(*conditions)


def _person_name_condition(column, value: str) -> ColumnElement:
    """Case-insensitive for every script: the value, folded as storage.text folds, against
    the folded column (so `SMITH^A*` is a prefix match on an index). A query without '='
    matches the alphabetic group of a stored name."""
    pattern, groups_pattern = person_name_patterns(value)
    condition = CaseSensitiveLike(column, pattern) if has_wildcard(pattern) else column == pattern
    if groups_pattern is not None:
        condition = or_(condition, CaseSensitiveLike(column, groups_pattern))
    return condition


def _uid_condition(spec: KeySpec, column, values: list[str]) -> ColumnElement:
    return column.in_(values) if len(values) > 1 else column == values[0]


def _number_condition(spec: KeySpec, column, values: list[str]) -> ColumnElement:
    return column.in_(integers(spec.keyword, tag_for_keyword(spec.keyword), values))


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
    column = LEVEL_TABLE[spec.level].c[spec.match_column or spec.column]
    if spec.kind in (MatchKind.TEXT, MatchKind.PERSON_NAME):
        return _text_condition(spec, column, values)
    if spec.kind is MatchKind.UID:
        return _uid_condition(spec, column, values)
    if spec.kind is MatchKind.NUMBER:
        return _number_condition(spec, column, values)
    conditions = [_date_time_condition(spec.kind, spec.keyword, column, v) for v in values]
    return any_of(conditions)


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


def from_clause(level: Level):
    """The index's tables joined down to `level`."""
    joined = _patient
    if level >= Level.STUDY:
        joined = joined.join(_study, _study.c.patient_pk == _patient.c.id)
    if level >= Level.SERIES:
        joined = joined.join(_series, _series.c.study_pk == _study.c.id)
    if level >= Level.IMAGE:
        joined = joined.join(_instance, _instance.c.series_pk == _series.c.id)
    return joined


# --- any other attribute: instance_attribute --------------------------------------------


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


def _attribute_condition(key: QueryKey, level: Level) -> ColumnElement:
    """Some instance of the row's level holds a value of this attribute that matches."""
    keyword, values = key.keyword, list(key.values)
    kind = attribute_kind(attribute_vr(key))
    attribute = _attribute.alias("match_attribute")
    if kind is MatchKind.PERSON_NAME:
        wanted = _person_names_condition(attribute.c.folded, values)
    elif kind in (MatchKind.DATE, MatchKind.TIME, MatchKind.DATETIME):
        wanted = any_of([_date_time_condition(kind, keyword, attribute.c.value, v) for v in values])
    elif kind is MatchKind.UID:
        wanted = attribute.c.value.in_(values)
    else:
        spec = KeySpec(keyword, level, MatchKind.TEXT)
        wanted = _text_condition(spec, attribute.c.value, values)
    return exists().where(_tag_is(attribute, key.tag), *_attribute_scope(level, attribute), wanted)


def _attribute_column(tag: int, level: Level) -> ColumnElement:
    """The values of the first instance (of the row's level) that holds the attribute,
    joined with backslashes."""
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
