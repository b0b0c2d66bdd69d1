"""A find request independent of the protocol that carried it, and the checks every
constructor applies.

A `FindRequest` is what a C-FIND identifier, a QIDO-RS query string or a command line
asks: the information model, the level, the keys (matched when they have values, all
returned) and the character sets the requester named. It holds no pydicom Dataset and no
SOP class UID. Its constructors are storage.query.identifier (a DIMSE identifier) and
storage.query.parameters (query parameters); both run the checks below, key by key in
the requester's order, so that the first fault is the one reported, and a request they
return can be matched.

The rules (PS3.4 C.4.1): levels PATIENT (Patient Root only), STUDY, SERIES and IMAGE.
Relational queries (the default) may leave out the unique keys above the level;
hierarchical ones must give each with a single value (a UID key may hold a list of UIDs),
Patient Root putting PatientID above STUDY. Breaking these raises `IdentifierMismatchError`;
a value the node cannot match (a malformed date) `UnprocessableQueryError`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pydicom.datadict import tag_for_keyword

from storage.query.errors import IdentifierMismatchError, QueryError, UnprocessableQueryError
from storage.query.keys import KEY_SPECS, QUERY_LEVEL_TAG, KeyRole, QueryKey, attribute_vr, key_role
from storage.query.matching import (
    MAX_VALUES_PER_QUERY,
    MatchKind,
    attribute_kind,
    check_values,
    has_wildcard,
)
from storage.query.model import UNIQUE_KEYS, Level, QueryModel


@dataclass(frozen=True)
class FindRequest:
    """One query: matched at `level` of `model`, answered with `keys`, in tag order."""

    model: QueryModel
    level: Level
    keys: tuple[QueryKey, ...]
    character_sets: tuple[str, ...] = ()  # SpecificCharacterSet, as the requester named it

    def __post_init__(self) -> None:
        keys = tuple(sorted(self.keys, key=lambda key: key.tag))
        if len({key.tag for key in keys}) != len(keys):
            raise ValueError("a find request names each key once")
        total = sum(len(key.values) for key in keys if not key.is_universal)
        if total > MAX_VALUES_PER_QUERY:
            raise UnprocessableQueryError(
                f"{total} values in the query, at most {MAX_VALUES_PER_QUERY}"
            )
        object.__setattr__(self, "keys", keys)

    @property
    def matching_keys(self) -> tuple[QueryKey, ...]:
        """The keys with a value that selects (not universal)."""
        return tuple(key for key in self.keys if not key.is_universal)

    def key(self, keyword: str) -> QueryKey | None:
        return next((key for key in self.keys if key.keyword == keyword), None)


def split_values(texts: Iterable[str]) -> list[str]:
    """Values as a request holds them: split at backslashes, stripped, empty ones left out."""
    parts = (part.strip() for text in texts for part in text.split("\\"))
    return [part for part in parts if part]


def parse_level(model: QueryModel, values: list[str]) -> Level:
    """The level a QueryRetrieveLevel value names, valid for `model`."""
    if len(values) != 1:
        raise IdentifierMismatchError(
            "QueryRetrieveLevel missing or not single-valued", (QUERY_LEVEL_TAG,)
        )
    try:
        level = Level[values[0].upper()]
    except KeyError:
        raise IdentifierMismatchError(
            f"QueryRetrieveLevel {values[0][:16]!r} is not valid", (QUERY_LEVEL_TAG,)
        ) from None
    if model is QueryModel.STUDY_ROOT and level is Level.PATIENT:
        raise IdentifierMismatchError("Study Root has no PATIENT level", (QUERY_LEVEL_TAG,))
    return level


def check_hierarchy(model: QueryModel, level: Level, values_of: Callable[[str], list[str]]) -> None:
    """Unique keys above the query level: present, single value (or UID list), no wildcard.

    Only for hierarchical queries: a relational query may leave them out or match them
    like any other key. `values_of(keyword)` gives a key's values ([] when absent)."""
    top = Level.PATIENT if model is QueryModel.PATIENT_ROOT else Level.STUDY
    for above in Level:
        if not top <= above < level:
            continue
        keyword = UNIQUE_KEYS[above]
        tag = tag_for_keyword(keyword)
        values = values_of(keyword)
        if not values or any(not v or has_wildcard(v) for v in values):
            raise IdentifierMismatchError(f"{level.name} query needs a {keyword} value", (tag,))
        if len(values) > 1 and KEY_SPECS[keyword].kind is not MatchKind.UID:
            raise IdentifierMismatchError(f"{keyword} must be a single value", (tag,))


def check_key(key: QueryKey, level: Level) -> None:
    """Raise the QueryError that matching `key` at `level` would raise, naming its tag."""
    if key.is_universal:
        return
    role, spec = key_role(key, level)
    if role is KeyRole.UNSUPPORTED:
        return  # not matched on: reported, not refused
    kind: MatchKind = attribute_kind(attribute_vr(key)) if spec is None else spec.kind
    try:
        check_values(kind, key.keyword, key.tag, key.values)
    except QueryError as exc:
        exc.offending = exc.offending or (key.tag,)
        raise
