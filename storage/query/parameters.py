"""A find request from query parameters: keyword or tag -> value strings, and a level,
as a DICOMweb QIDO-RS query string (PS3.18 8.3.4) or a command line gives them.

A parameter names its attribute by keyword (`PatientName`) or by tag as eight hex digits
(`00100010`); its value is a string (several values separated by backslashes, as in a
DICOM value) or a sequence of strings, an empty one asking only that the key be returned.
`include` names keys to return without matching (QIDO-RS `includefield`). The values then
go through the same checks as a DIMSE identifier's (storage.query.request), and every
fault is a QueryError whose message names the parameter.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.tag import Tag

from storage.query.errors import IdentifierMismatchError, UnprocessableQueryError
from storage.query.keys import CHARSET_TAG, QUERY_LEVEL_TAG, SCP_FILLED, QueryKey
from storage.query.model import Level, QueryModel
from storage.query.request import (
    FindRequest,
    check_hierarchy,
    check_key,
    parse_level,
    split_values,
)

_HEX_TAG = re.compile(r"[0-9A-Fa-f]{8}")

Values = str | Sequence[str]


def request_from_parameters(
    level: Level | str,
    parameters: Mapping[str, Values],
    *,
    include: Iterable[str] = (),
    model: QueryModel = QueryModel.STUDY_ROOT,
    relational: bool = True,
) -> FindRequest:
    """Validate `parameters` at `level` of `model` and read them as a request.

    `relational` as for a DIMSE identifier (QIDO-RS queries are relational). Raises
    IdentifierMismatchError (a level the model does not have, a missing unique key of a
    hierarchical query, the level given as a key) or UnprocessableQueryError (a name that
    is no attribute, a key given twice, a value that cannot be matched)."""
    level_name = level.name if isinstance(level, Level) else str(level).strip()
    level = parse_level(model, [level_name] if level_name else [])
    keys: dict[int, QueryKey] = {}
    character_sets: tuple[str, ...] = ()
    named: set[int] = set()
    given = [(name, value) for name, value in parameters.items()]
    for position, (name, value) in enumerate(given + [(name, "") for name in include]):
        tag = _tag(name)
        if tag in named and position < len(given):
            raise UnprocessableQueryError(f"{name}: the key is given twice", (tag,))
        if tag in named:
            continue  # a matched key also named in `include`: returned once
        named.add(tag)
        values = _split(name, value)
        if tag == QUERY_LEVEL_TAG:
            raise IdentifierMismatchError(
                "QueryRetrieveLevel is the level, not a key", (QUERY_LEVEL_TAG,)
            )
        if tag == CHARSET_TAG:
            character_sets = tuple(values)
        elif tag not in SCP_FILLED:
            keys[tag] = _key(name, tag, values)
    if not relational:
        check_hierarchy(model, level, lambda keyword: _values_of(keys, keyword))
    for key in keys.values():
        check_key(key, level)
    return FindRequest(model, level, tuple(keys.values()), character_sets)


def _tag(name: str) -> int:
    """The tag a parameter names: a keyword, or eight hex digits."""
    tag = tag_for_keyword(name)
    if tag is None and _HEX_TAG.fullmatch(name):
        tag = int(name, 16)
    if tag is None:
        raise UnprocessableQueryError(f"{name[:40]!r} is not a DICOM keyword or tag")
    if Tag(tag).group < 0x0008 or Tag(tag).element == 0x0000:
        raise UnprocessableQueryError(f"{name}: a command, file meta or group length element")
    return tag


def _split(name: str, value: Values) -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not all(isinstance(text, str) for text in texts):
        raise UnprocessableQueryError(f"{name}: values must be strings")
    return split_values(texts)


def _key(name: str, tag: int, values: list[str]) -> QueryKey:
    keyword = keyword_for_tag(tag) or str(Tag(tag))
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        vr = ""  # a private or unknown attribute: matched and returned as LO
    if vr == "SQ":
        if values:
            raise UnprocessableQueryError(f"{name}: a sequence key takes no value", (tag,))
        return QueryKey(tag, keyword, vr)
    return QueryKey(tag, keyword, vr, tuple(values))


def _values_of(keys: dict[int, QueryKey], keyword: str) -> list[str]:
    key = keys.get(tag_for_keyword(keyword) or -1)
    return list(key.values) if key is not None else []
