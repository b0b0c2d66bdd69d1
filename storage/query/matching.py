"""The matching rules of PS3.4 C.2.2, on value strings: no SQL and no pydicom here.

Which values match everything (universal matching), which hold wildcards, what range of
stored text a DA/TM/DT value or range covers, how a person name is folded, and which
values must be integers. storage.query.sql turns these into clauses; the request
constructors run `check_values` so that a bad value is refused, naming its key, before
anything is built.

- TM and DT values match to the precision they are written in: `0930` as a single value
  or an upper bound covers 09:30:00 to 09:30:59.999999 (stored times written with fewer
  digits compare as if padded with zeros: that part is SQL, in storage.query.sql).
- A DT value's `-` is a range unless it can be a UTC offset (`20200101120000-0500`).
- Person names are compared case-folded (storage.text), and a query without `=` also
  matches the alphabetic group of a stored name.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass

from storage.query.errors import UnprocessableQueryError
from storage.text import fold_case


class MatchKind(enum.Enum):
    TEXT = "text"  # single value and wildcard, case-sensitive
    PERSON_NAME = "pn"  # single value and wildcard, case-insensitive, by component group
    UID = "uid"  # single value and list of UIDs
    DATE = "da"
    TIME = "tm"
    DATETIME = "dt"
    NUMBER = "number"  # IS/US stored as integers
    DECIMAL = "decimal"  # a DS attribute: matched as text, its values must be decimals
    INTEGER_STRING = "integer"  # an IS attribute: matched as text, its values integers
    MODALITIES = "modalities"  # ModalitiesInStudy: a study matches if one series does
    SOP_CLASSES = "sop classes"  # SOPClassesInStudy: a study matches if one instance does
    COUNT = "count"  # computed, returned only


# How an attribute outside the index columns (instance_attribute) is matched, by its VR.
_ATTRIBUTE_KINDS = {
    "PN": MatchKind.PERSON_NAME,
    "DA": MatchKind.DATE,
    "TM": MatchKind.TIME,
    "DT": MatchKind.DATETIME,
    "UI": MatchKind.UID,
    "DS": MatchKind.DECIMAL,
    "IS": MatchKind.INTEGER_STRING,
}

# Value lists (PS3.4 C.2.2.2.8): how many values one key, and one query, may hold. Exact
# values are matched with one `IN (...)` of bound parameters each (SQLite allows 32,766
# per statement, PostgreSQL 65,535); a person name, a value with a wildcard, a date or a
# time is a clause of its own, and storage.query.sql ORs those in nested groups, since
# SQLite refuses expressions nested more than 1,000 deep ("Expression tree is too large").
# Past these limits the query is refused with UnprocessableQueryError (C-FIND 0xC000 and an
# ErrorComment that says so) before any SQL runs.
MAX_VALUES_PER_KEY = 5000
MAX_VALUES_PER_QUERY = 20000
MAX_PATTERNS_PER_KEY = 1000  # values with a wildcard, dates, times (each a LIKE or range)


def attribute_kind(vr: str) -> MatchKind:
    """The matching of an attribute key of VR `vr`: text unless PN, DA, TM, DT or UI."""
    return _ATTRIBUTE_KINDS.get(vr, MatchKind.TEXT)


def is_universal(values: Iterable[str]) -> bool:
    """Universal matching: no value, or only `*`."""
    return all(set(v) <= {"*"} for v in values)


def has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


# --- dates and times ---------------------------------------------------------------------

_DA = re.compile(r"\d{8}")
_TM = re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?")
_DT = re.compile(r"\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?")
_OFFSET = re.compile(r"[+-]\d{4}$")
# Upper ends of each component, used to extend a value to the end of its precision.
_TM_MAX = "235959.999999"
_DT_MAX = "99991231235959.999999"


@dataclass(frozen=True)
class TimeBounds:
    """What one DA/TM/DT value selects: `equal` (a single date), or the stored values from
    `lower` to `upper` inclusive, either end open (None)."""

    lower: str | None = None
    upper: str | None = None
    equal: str | None = None


def time_bounds(kind: MatchKind, keyword: str, value: str) -> TimeBounds:
    """The bounds of a single value or a range `a-b`, `a-`, `-b`; UnprocessableQueryError
    for anything else."""
    parts = [value] if _is_single_dt_with_offset(kind, value) else value.split("-")
    if len(parts) == 1:
        single = _normalise(kind, keyword, parts[0])
        if kind is MatchKind.DATE:
            return TimeBounds(equal=single)
        return TimeBounds(_OFFSET.sub("", single), _upper_end(kind, single))
    if len(parts) != 2 or not (parts[0] or parts[1]):
        raise UnprocessableQueryError(f"{keyword}: {value!r} is not a single value or range")
    lower = _OFFSET.sub("", _normalise(kind, keyword, parts[0])) if parts[0] else None
    upper = _upper_end(kind, _normalise(kind, keyword, parts[1])) if parts[1] else None
    return TimeBounds(lower, upper)


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
        clock = _OFFSET.sub("", value).split(".")[0][8:]
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
        value = _OFFSET.sub("", value)  # offsets are not compared
        template = _DT_MAX
    else:
        template = _TM_MAX
    if "." in value:
        whole, fraction = value.split(".")
        return f"{whole}.{fraction.ljust(6, '9')}"
    # Month 12 and day 31 are upper ends for a comparison as text, whatever the month.
    return value + template[len(value) :]


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


# --- person names and numbers ------------------------------------------------------------


def person_name_patterns(value: str) -> tuple[str, str | None]:
    """The folded pattern a stored (folded) name must match, and a second one it may match
    instead: the alphabetic group followed by others, for a query without '=' (None when
    the first pattern covers that already)."""
    groups = [group.rstrip("^ ") for group in fold_case(value).split("=")]
    pattern = "=".join(groups).rstrip("=")
    if "=" not in value and not pattern.endswith("*"):  # `...*` covers the groups too
        return pattern, pattern + "=*"
    return pattern, None


def integers(keyword: str, tag: int, values: Iterable[str]) -> list[int]:
    """The values of an IS/US key as integers; UnprocessableQueryError naming the key."""
    numbers = []
    for value in values:
        try:
            numbers.append(int(value))
        except ValueError:
            raise UnprocessableQueryError(
                f"{keyword}: {value[:20]!r} is not an integer", (tag,)
            ) from None
    return numbers


_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def decimals(keyword: str, tag: int, values: Iterable[str]) -> None:
    """Raise UnprocessableQueryError for a value that is not a Decimal String (PS3.5 6.2:
    a fixed or floating point number, at most 16 characters)."""
    for value in values:
        if len(value) > 16 or not _DECIMAL.fullmatch(value):
            raise UnprocessableQueryError(f"{keyword}: {value[:20]!r} is not a decimal", (tag,))


def check_values(kind: MatchKind, keyword: str, tag: int, values: Iterable[str]) -> None:
    """Raise the UnprocessableQueryError that matching `values` as `kind` would raise.

    A malformed value is refused the same way whatever its type (DA, TM, DT, IS, DS; an
    index column or any other attribute): 0xC000 in C-FIND, naming the key. Matching it
    instead would answer Success with no match, which tells a requester with a typo that
    nothing is there rather than that its query was wrong, and 0 matches for one type
    beside a refusal for another would make the same mistake look like two.
    """
    values = list(values)
    check_list_size(kind, keyword, tag, values)
    if kind in (MatchKind.DATE, MatchKind.TIME, MatchKind.DATETIME):
        for value in values:
            time_bounds(kind, keyword, value)
    elif kind in (MatchKind.NUMBER, MatchKind.INTEGER_STRING):
        integers(keyword, tag, values)
    elif kind is MatchKind.DECIMAL:
        decimals(keyword, tag, values)


def is_pattern(kind: MatchKind, value: str) -> bool:
    """Whether `value` is a clause of its own in SQL rather than one entry of an IN list."""
    if kind in (MatchKind.DATE, MatchKind.TIME, MatchKind.DATETIME):
        return True
    if kind in (MatchKind.UID, MatchKind.NUMBER, MatchKind.SOP_CLASSES):
        return False
    return has_wildcard(value)


def check_list_size(kind: MatchKind, keyword: str, tag: int, values: list[str]) -> None:
    """Refuse a value list longer than the documented limits (MAX_VALUES_PER_KEY)."""
    if len(values) > MAX_VALUES_PER_KEY:
        raise UnprocessableQueryError(
            f"{keyword}: {len(values)} values, at most {MAX_VALUES_PER_KEY}", (tag,)
        )
    patterns = sum(1 for value in values if is_pattern(kind, value))
    if patterns > MAX_PATTERNS_PER_KEY:
        raise UnprocessableQueryError(
            f"{keyword}: {patterns} wildcard/range values, at most {MAX_PATTERNS_PER_KEY}",
            (tag,),
        )
