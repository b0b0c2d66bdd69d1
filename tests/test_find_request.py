"""The transport-neutral find request: built from a DIMSE identifier or from query
parameters (as QIDO-RS gives them), the same query is the same request and finds the same
rows; a bad parameter is refused with a message that names it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from find_data import all_studies, series_uid, study_uid
from find_data import synthetic_instances as make_synthetic
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from sqlalchemy import Engine

from storage.archive import Archive
from storage.database import create_index_engine
from storage.filestore import FileStore
from storage.query.encode_dimse import encoded_responses
from storage.query.errors import IdentifierMismatchError, QueryError, UnprocessableQueryError
from storage.query.identifier import query_model, request_from_identifier
from storage.query.keys import QueryKey
from storage.query.model import Level, QueryModel
from storage.query.parameters import request_from_parameters
from storage.query.request import FindRequest
from storage.query.selection import retrieve_instances
from storage.query.sql import prepare

# Query values such as 'D*' or '' for Rows are valid C-FIND keys, not valid attribute values.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Invalid value for VR"),
    pytest.mark.filterwarnings("ignore:A value of type 'str' cannot be assigned"),
]

STUDY_ROOT = StudyRootQueryRetrieveInformationModelFind
PATIENT_ROOT = PatientRootQueryRetrieveInformationModelFind
AE_TITLE = "UNITNODE"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    folder: Path = tmp_path_factory.mktemp("request_index")
    engine = create_index_engine(f"sqlite:///{folder / 'index.sqlite'}")
    archive = Archive(FileStore(folder / "files", fsync=False), engine)
    for ds in make_synthetic():
        archive.store_dataset(ds, is_result=False)
    yield engine
    engine.dispose()


def identifier(level: str, keys: dict[str, str]) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def matches(engine: Engine, request: FindRequest) -> list[bytes]:
    with engine.connect() as conn:
        return list(encoded_responses(prepare(request), conn, AE_TITLE, implicit_vr=False))


# (root, level, keys): each as a DIMSE identifier's keywords and as query parameters.
QUERIES = [
    (STUDY_ROOT, "STUDY", {"PatientName": "doe*", "StudyDate": "", "StudyInstanceUID": ""}),
    (STUDY_ROOT, "STUDY", {"StudyDate": "20200101-20201231", "ModalitiesInStudy": "",
                           "NumberOfStudyRelatedInstances": "", "AccessionNumber": "ACC?1"}),
    (STUDY_ROOT, "SERIES", {"StudyInstanceUID": f"{study_uid('S1')}\\{study_uid('S3')}",
                            "Modality": "CR\\MR", "SeriesNumber": "", "SeriesInstanceUID": ""}),
    (STUDY_ROOT, "IMAGE", {"SeriesInstanceUID": series_uid("S2", 3), "SOPInstanceUID": "",
                           "InstanceNumber": "2", "Rows": "", "ViewPosition": ""}),
    (PATIENT_ROOT, "PATIENT", {"PatientID": "FIND*", "PatientName": "",
                               "NumberOfPatientRelatedStudies": "",
                               "SpecificCharacterSet": "ISO_IR 100"}),
    (STUDY_ROOT, "STUDY", {"StudyTime": "0900-1000", "PatientAge": "", "Modality": "MR",
                           "StudyInstanceUID": ""}),
]  # fmt: skip


@pytest.mark.parametrize(("root", "level", "keys"), QUERIES)
def test_identifier_and_parameters_make_the_same_request(
    engine: Engine, root: str, level: str, keys: dict[str, str]
) -> None:
    from_dimse = request_from_identifier(identifier(level, keys), root)
    from_parameters = request_from_parameters(level, keys, model=query_model(root))
    assert from_parameters == from_dimse
    assert prepare(from_parameters).ignored_keys == prepare(from_dimse).ignored_keys
    found = matches(engine, from_parameters)
    assert found == matches(engine, from_dimse)
    assert found, "the query should match something"


def test_a_request_holds_no_dataset_and_no_sop_class() -> None:
    request = request_from_identifier(
        identifier("STUDY", {"StudyDate": "20210615", "PatientName": ""}),
        STUDY_ROOT,
    )
    assert request == FindRequest(
        QueryModel.STUDY_ROOT,
        Level.STUDY,
        (
            QueryKey(0x00100010, "PatientName", "PN"),
            QueryKey(0x00080020, "StudyDate", "DA", ("20210615",)),
        ),
    )
    assert [key.keyword for key in request.keys] == ["StudyDate", "PatientName"]  # tag order
    assert [key.keyword for key in request.matching_keys] == ["StudyDate"]


def test_tags_lists_and_include_fields() -> None:
    by_keyword = request_from_parameters(
        "study",
        {"StudyInstanceUID": [study_uid("S1"), study_uid("S3")], "00100010": ""},
        include=["StudyDescription", "PatientName"],
    )
    by_tag = request_from_parameters(
        Level.STUDY,
        {"0020000D": f"{study_uid('S1')}\\{study_uid('S3')}", "PatientName": ""},
        include=["00081030"],
    )
    assert by_keyword == by_tag
    assert [key.keyword for key in by_keyword.keys] == [
        "StudyDescription",
        "PatientName",
        "StudyInstanceUID",
    ]
    private = request_from_parameters("IMAGE", {"00091010": "X*"})
    assert private.keys == (QueryKey(0x00091010, "(0009,1010)", "", ("X*",)),)


def test_equivalent_requests_select_the_same_instances(engine: Engine) -> None:
    keys = {"StudyInstanceUID": study_uid("S1")}
    from_dimse = request_from_identifier(
        identifier("STUDY", keys), StudyRootQueryRetrieveInformationModelMove
    )
    from_parameters = request_from_parameters("STUDY", keys)
    with engine.connect() as conn:
        selected = retrieve_instances(conn, from_parameters)
        assert selected == retrieve_instances(conn, from_dimse)
    study = next(s for _, s in all_studies() if s.key == "S1")
    assert len(selected) == sum(series.instances for series in study.series)


@pytest.mark.parametrize(
    ("level", "parameters", "kind", "message", "offending"),
    [
        ("STUDY", {"PatientNmae": "DOE"}, UnprocessableQueryError,
         "'PatientNmae' is not a DICOM keyword or tag", ()),
        ("STUDY", {"StudyDate": "2020"}, UnprocessableQueryError,
         "StudyDate: '2020' is not a valid DA", ("StudyDate",)),
        ("STUDY", {"StudyTime": "0930-1000-1100"}, UnprocessableQueryError,
         "StudyTime: '0930-1000-1100' is not a single value or range", ("StudyTime",)),
        ("SERIES", {"SeriesNumber": "one"}, UnprocessableQueryError,
         "SeriesNumber: 'one' is not an integer", ("SeriesNumber",)),
        ("IMAGE", {"ContentDate": "2020-13-01"}, UnprocessableQueryError,
         "ContentDate: '2020-13-01' is not a single value or range", ("ContentDate",)),
        ("STUDY", {"PatientName": "DOE", "00100010": "SMITH"}, UnprocessableQueryError,
         "00100010: the key is given twice", ("PatientName",)),
        ("STUDY", {"ReferencedStudySequence": "1.2.3"}, UnprocessableQueryError,
         "ReferencedStudySequence: a sequence key takes no value", ("ReferencedStudySequence",)),
        ("STUDY", {"StudyDate": ["20200101", 20200102]}, UnprocessableQueryError,
         "StudyDate: values must be strings", ()),
        ("STUDY", {"00100000": ""}, UnprocessableQueryError,
         "00100000: a command, file meta or group length element", ()),
        ("STUDY", {"QueryRetrieveLevel": "SERIES"}, IdentifierMismatchError,
         "QueryRetrieveLevel is the level, not a key", ("QueryRetrieveLevel",)),
        ("FRAME", {}, IdentifierMismatchError,
         "QueryRetrieveLevel 'FRAME' is not valid", ("QueryRetrieveLevel",)),
        ("PATIENT", {}, IdentifierMismatchError,
         "Study Root has no PATIENT level", ("QueryRetrieveLevel",)),
        ("", {}, IdentifierMismatchError,
         "QueryRetrieveLevel missing or not single-valued", ("QueryRetrieveLevel",)),
    ],
)  # fmt: skip
def test_bad_parameters_are_refused_by_name(
    level: str,
    parameters: dict[str, object],
    kind: type[QueryError],
    message: str,
    offending: tuple[str, ...],
) -> None:
    with pytest.raises(kind) as raised:
        request_from_parameters(level, parameters)  # type: ignore[arg-type]
    assert str(raised.value) == message
    assert raised.value.comment == message[:64]
    assert raised.value.offending == tuple(int(Tag(keyword)) for keyword in offending)


def test_the_first_bad_parameter_is_the_one_named() -> None:
    with pytest.raises(UnprocessableQueryError, match="^StudyTime: '25'"):
        request_from_parameters("STUDY", {"StudyTime": "25", "StudyDate": "2020"})


def test_hierarchical_parameters_follow_the_dimse_rules() -> None:
    keys = {"PatientID": "FIND*", "StudyInstanceUID": ""}
    request_from_parameters("STUDY", keys, model=QueryModel.PATIENT_ROOT)  # relational
    with pytest.raises(IdentifierMismatchError) as from_dimse:
        request_from_identifier(identifier("STUDY", keys), PATIENT_ROOT, relational=False)
    with pytest.raises(IdentifierMismatchError) as from_parameters:
        request_from_parameters("STUDY", keys, model=QueryModel.PATIENT_ROOT, relational=False)
    assert str(from_parameters.value) == str(from_dimse.value)
    assert str(from_parameters.value) == "STUDY query needs a PatientID value"
    assert from_parameters.value.offending == from_dimse.value.offending


def test_query_models_of_the_sop_classes() -> None:
    assert query_model(PATIENT_ROOT) is QueryModel.PATIENT_ROOT
    assert query_model(StudyRootQueryRetrieveInformationModelMove) is QueryModel.STUDY_ROOT
    assert query_model(PatientRootQueryRetrieveInformationModelGet, ("Move", "Get")) is (
        QueryModel.PATIENT_ROOT
    )
    for sop_class, services in [
        (Verification, ("Find", "Move", "Get")),
        (StudyRootQueryRetrieveInformationModelMove, ("Find",)),
        ("not a UID", ("Find",)),
    ]:
        with pytest.raises(ValueError):
            query_model(sop_class, services)
