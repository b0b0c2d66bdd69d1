"""A find request from a DIMSE identifier: a C-FIND, C-MOVE or C-GET request's data set
and its Query/Retrieve SOP class.

Here are the checks an identifier must pass and the statuses its faults are answered with
(PS3.4 C.4.1.1.4, C.4.2.1.5): 0xA900 when it breaks the information model, 0xC000 when a
value cannot be understood or an element cannot be decoded (pydicom decodes lazily: a
corrupt element fails when it is read, and is then named). The node's SCPs call this;
nothing here speaks to the network. Command, file meta and group length elements are not
keys; SpecificCharacterSet, QueryRetrieveLevel and RetrieveAETitle are read or left out,
not matched.
"""

from __future__ import annotations

from collections.abc import Collection

from pydicom._uid_dict import UID_dictionary
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag

from storage.query.errors import IdentifierMismatchError, QueryError, UnprocessableQueryError
from storage.query.keys import CHARSET_TAG, QUERY_LEVEL_TAG, SCP_FILLED, QueryKey
from storage.query.model import QueryModel
from storage.query.request import (
    FindRequest,
    check_hierarchy,
    check_key,
    parse_level,
    split_values,
)

STATUS_IDENTIFIER_MISMATCH = 0xA900  # Identifier does not match SOP Class
STATUS_UNABLE_TO_PROCESS = 0xC000

SERVICES = ("Find", "Move", "Get")
_ROOTS = {"PatientRoot": QueryModel.PATIENT_ROOT, "StudyRoot": QueryModel.STUDY_ROOT}


def _sop_class_models() -> dict[str, tuple[QueryModel, str]]:
    """{SOP class UID: (model, service)} for the Patient and Study Root Query/Retrieve
    SOP classes, found by their PS3.6 keywords in pydicom's UID dictionary (storage does
    not import the networking package that names them too)."""
    wanted = {
        f"{root}QueryRetrieveInformationModel{service}": (model, service)
        for root, model in _ROOTS.items()
        for service in SERVICES
    }
    return {uid: wanted[entry[4]] for uid, entry in UID_dictionary.items() if entry[4] in wanted}


_SOP_CLASS_MODELS = _sop_class_models()


def query_model(sop_class_uid: str, services: Collection[str] = SERVICES) -> QueryModel:
    """The information model of a Patient or Study Root SOP class of one of `services`
    ("Find", "Move", "Get"); ValueError for any other SOP class."""
    found = _SOP_CLASS_MODELS.get(str(sop_class_uid))
    if found is None or found[1] not in services:
        names = "/".join(services)
        raise ValueError(f"{sop_class_uid} is not a Patient or Study Root {names} class")
    return found[0]


def failure_status(error: QueryError) -> int:
    """The DIMSE status that answers an identifier the node will not process."""
    if isinstance(error, IdentifierMismatchError):
        return STATUS_IDENTIFIER_MISMATCH
    return STATUS_UNABLE_TO_PROCESS


def request_from_identifier(
    identifier: Dataset, sop_class_uid: str, *, relational: bool = True
) -> FindRequest:
    """Validate `identifier` for the model of `sop_class_uid` and read it as a request.

    `relational` answers queries without the unique keys above their level (PS3.4
    C.4.1.2.2); otherwise the hierarchical rules apply. Raises IdentifierMismatchError or
    UnprocessableQueryError (both QueryError); ValueError for a SOP class that is not
    Query/Retrieve.
    """
    model = query_model(sop_class_uid)
    level = parse_level(model, _values_of(identifier, Tag(QUERY_LEVEL_TAG)))
    if not relational:
        check_hierarchy(model, level, lambda keyword: _values_of(identifier, Tag(keyword)))
    keys: list[QueryKey] = []
    character_sets: tuple[str, ...] = ()
    for tag in list(identifier.keys()):
        if tag.group < 0x0008 or tag.element == 0x0000:
            continue  # command, file meta and group length elements are not keys
        element = _element(identifier, tag)
        if tag == CHARSET_TAG:
            character_sets = tuple(_values(element))
            continue
        if tag in SCP_FILLED:
            continue
        key = _key(element)
        check_key(key, level)
        keys.append(key)
    return FindRequest(model, level, tuple(keys), character_sets)


def _key(element: DataElement) -> QueryKey:
    tag = element.tag
    keyword = element.keyword or str(tag)
    vr = str(element.VR or "")
    if vr == "SQ":
        return QueryKey(int(tag), keyword, vr, sequence_items=bool(element.value))
    return QueryKey(int(tag), keyword, vr, tuple(_values(element)))


def _values(element: DataElement | None) -> list[str]:
    """The element's values as stripped strings; [] when absent or zero-length."""
    value = None if element is None else element.value
    if value is None or value == "":
        return []
    items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    return split_values(str(item) for item in items if item is not None)


def _values_of(identifier: Dataset, tag: BaseTag) -> list[str]:
    return _values(_element(identifier, tag))


def _element(identifier: Dataset, tag: BaseTag) -> DataElement | None:
    try:
        return identifier.get(tag)
    except Exception as exc:  # pydicom defers decoding; a corrupt element raises here
        name = keyword_for_tag(tag) or str(tag)
        raise UnprocessableQueryError(f"cannot decode {name}", (int(tag),)) from exc
