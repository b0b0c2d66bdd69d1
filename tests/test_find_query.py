"""storage/query/ on its own: an index filled through storage.archive.Archive, no network.

The index holds a few SIIM files and the synthetic instances of find_data, so every
matching rule can be checked against known values.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from find_data import SYNTHETIC_INSTANCE_COUNT, all_studies, series_uid, study_uid
from find_data import synthetic_instances as make_synthetic
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)
from sqlalchemy import Engine, event
from sqlalchemy.dialects import postgresql
from support import siim_files

from storage.archive import Archive
from storage.database import create_index_engine
from storage.filestore import FileStore
from storage.query.encode_dimse import encoded_responses, response_datasets
from storage.query.errors import IdentifierMismatchError, UnprocessableQueryError
from storage.query.identifier import request_from_identifier
from storage.query.like import CaseSensitiveLike
from storage.query.model import Level
from storage.query.sql import PreparedFind, prepare

# Query values such as 'D*' or '20200101-20201231' are valid C-FIND keys, not valid
# attribute values, and pydicom says so; these tests write them on purpose.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Invalid value for VR"),
    pytest.mark.filterwarnings("ignore:A value of type 'str' cannot be assigned"),
]

SIIM_SAMPLE = 5
PATIENT = PatientRootQueryRetrieveInformationModelFind
STUDY = StudyRootQueryRetrieveInformationModelFind
AE_TITLE = "UNITNODE"


def prepare_find(identifier: Dataset, model: str, *, relational: bool = True) -> PreparedFind:
    """What the FIND SCP does with an identifier before it answers."""
    return prepare(request_from_identifier(identifier, model, relational=relational))


def find(engine: Engine, identifier: Dataset, model: str, ae_title: str) -> Iterator[Dataset]:
    """Prepare and stream the matches of one identifier on a fresh connection."""
    prepared = prepare_find(identifier, model)
    with engine.connect() as conn:
        yield from response_datasets(prepared, conn, ae_title)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    folder: Path = tmp_path_factory.mktemp("query_index")
    engine = create_index_engine(f"sqlite:///{folder / 'index.sqlite'}")
    archive = Archive(FileStore(folder / "files", fsync=False), engine)
    for path in siim_files()[:SIIM_SAMPLE]:
        archive.store_file_bytes(path.read_bytes())
    for ds in make_synthetic():
        archive.store_dataset(ds, is_result=False)
    yield engine
    engine.dispose()


def identifier(level: str, **keys: object) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def run(engine: Engine, model: str, level: str, **keys: object) -> list[Dataset]:
    query = identifier(level, **keys)
    matches = list(find(engine, query, model, AE_TITLE))
    assert_encoded_like_pydicom(engine, query, model)
    return matches


def assert_encoded_like_pydicom(engine: Engine, query: Dataset, model: str) -> None:
    """The identifiers encoded straight from rows (encode_dimse, what the SCP sends)
    are byte for byte what pydicom writes for the Datasets of `responses`."""
    prepared = prepare_find(query, model)
    with engine.connect() as conn:
        datasets = list(response_datasets(prepared, conn, AE_TITLE))
        for implicit_vr in (True, False):
            encoded = list(encoded_responses(prepared, conn, AE_TITLE, implicit_vr=implicit_vr))
            assert encoded == [encode(ds, implicit_vr, True) for ds in datasets]


def study_ids(engine: Engine, **keys: object) -> list[str]:
    """StudyID of the matching synthetic studies (SIIM studies have an empty StudyID)."""
    matches = run(engine, STUDY, "STUDY", StudyID="", **keys)
    return sorted(m.StudyID for m in matches if m.StudyID)


# --- levels and the hierarchy ------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "keys"),
    [
        (STUDY, {}),  # no QueryRetrieveLevel at all
        (STUDY, {"QueryRetrieveLevel": "FRAME"}),
        (STUDY, {"QueryRetrieveLevel": "PATIENT"}),  # Study Root has no PATIENT level
        (PATIENT, {"QueryRetrieveLevel": "STUDY"}),  # PatientID needed above STUDY
        (PATIENT, {"QueryRetrieveLevel": "STUDY", "PatientID": "FIND*"}),
        (PATIENT, {"QueryRetrieveLevel": "STUDY", "PatientID": "A\\B"}),
        (PATIENT, {"QueryRetrieveLevel": "SERIES", "PatientID": "FIND_2"}),
        (STUDY, {"QueryRetrieveLevel": "SERIES"}),
        (STUDY, {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": ""}),
        (STUDY, {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": study_uid("S1")}),
    ],
)
def test_level_and_hierarchy_errors(model: str, keys: dict[str, str]) -> None:
    ds = Dataset()
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    with pytest.raises(IdentifierMismatchError) as raised:
        prepare_find(ds, model, relational=False)
    assert raised.value.comment and len(raised.value.comment) <= 64
    assert raised.value.offending


@pytest.mark.parametrize(
    ("model", "level", "keys", "expected"),
    [
        (PATIENT, "STUDY", {"StudyDescription": ""}, 11),  # Patient Root, no PatientID
        (STUDY, "SERIES", {"Modality": "CT"}, None),  # no StudyInstanceUID
        (STUDY, "IMAGE", {"SOPInstanceUID": ""}, None),  # an IMAGE query with no upper keys
        (PATIENT, "SERIES", {"PatientID": "FIND_2", "SeriesInstanceUID": ""}, None),
    ],
)
def test_relational_queries_are_answered(engine: Engine, model, level, keys, expected) -> None:
    hierarchical_error = None
    try:
        prepare_find(identifier(level, **keys), model, relational=False)
    except IdentifierMismatchError as exc:
        hierarchical_error = exc
    assert hierarchical_error is not None  # the strict model refuses each of these
    matches = list(find(engine, identifier(level, **keys), model, AE_TITLE))
    assert matches
    if expected is not None:
        assert len(matches) == expected
    for match in matches:
        assert match.QueryRetrieveLevel == level


def test_uid_list_is_allowed_above_the_level(engine: Engine) -> None:
    matches = run(
        engine,
        STUDY,
        "SERIES",
        StudyInstanceUID=f"{study_uid('S1')}\\{study_uid('S3')}",
        SeriesInstanceUID="",
    )
    assert sorted(m.SeriesInstanceUID for m in matches) == sorted(
        [series_uid("S1", 1), series_uid("S1", 2), series_uid("S3", 1)]
    )


def test_patient_root_hierarchy_down_to_image(engine: Engine) -> None:
    matches = run(
        engine,
        PATIENT,
        "IMAGE",
        PatientID="FIND%1",
        StudyInstanceUID=study_uid("S2"),
        SeriesInstanceUID=series_uid("S2", 3),
        SOPInstanceUID="",
        InstanceNumber="",
    )
    assert [m.InstanceNumber for m in matches] == [1, 2, 3]
    # A PatientID that does not own the study finds nothing.
    assert not run(
        engine,
        PATIENT,
        "SERIES",
        PatientID="FIND_2",
        StudyInstanceUID=study_uid("S2"),
    )


# --- matching types ----------------------------------------------------------------------


def test_universal_matching_returns_every_study_with_values_filled(engine: Engine) -> None:
    matches = run(engine, STUDY, "STUDY", StudyInstanceUID="", StudyDate="")
    assert len(matches) == SIIM_SAMPLE + len(all_studies())
    assert all(m.StudyInstanceUID and m.StudyDate for m in matches)
    assert run(engine, STUDY, "STUDY", PatientID="*") == run(engine, STUDY, "STUDY", PatientID="")


def test_single_value_is_exact_and_case_sensitive(engine: Engine) -> None:
    assert study_ids(engine, AccessionNumber="ACC_2") == ["S2"]
    assert study_ids(engine, StudyDescription="CHEST") == []
    assert study_ids(engine, StudyDescription="chest pa") == []
    assert study_ids(engine, StudyDescription="CHEST PA") == ["S1"]


def test_person_names_match_without_regard_to_case(engine: Engine) -> None:
    assert study_ids(engine, PatientName="DOE^JOHN") == ["S4"]
    assert study_ids(engine, PatientName="doe*") == ["S3", "S4"]
    assert study_ids(engine, PatientName="müller^hans") == ["S1", "S2"]
    assert study_ids(engine, PatientName="DOE^JANE^") == ["S3"]  # trailing empty components


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"PatientID": "FIND%*"}, ["S1", "S2"]),
        ({"PatientID": "FIND_*"}, ["S3"]),
        ({"PatientID": "FIND!*"}, ["S5"]),
        ({"PatientID": "FIND[*"}, ["S6"]),
        ({"PatientID": "FIND?3"}, ["S4"]),
        ({"PatientID": "FIND?"}, []),
        ({"PatientID": "*X*"}, ["S4"]),
        ({"AccessionNumber": "ACC%?"}, ["S1"]),
        ({"AccessionNumber": "ACC[?]"}, ["S5"]),
        ({"StudyDescription": "CHEST*"}, ["S1", "S4"]),
        ({"StudyDescription": "chest*"}, []),
    ],
)
def test_wildcards_treat_sql_wildcards_literally(
    engine: Engine, keys: dict[str, str], expected: list[str]
) -> None:
    assert study_ids(engine, **keys) == expected


def test_like_pattern_escapes_for_other_databases() -> None:
    from storage.models import Patient

    clause = CaseSensitiveLike(Patient.__table__.c.patient_id, "A%_!*?")
    compiled = clause.compile(dialect=postgresql.dialect())
    assert " LIKE " in str(compiled) and str(compiled).endswith(" ESCAPE '!'")
    assert list(compiled.params.values()) == ["A!%!_!!%_"]


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"StudyDate": "20200101-20201231"}, ["S1", "S3"]),
        ({"StudyDate": "20200201-"}, ["S2", "S3", "S5", "S6"]),
        ({"StudyDate": "-19991231"}, ["S4"]),
        ({"StudyDate": "20210615"}, ["S2"]),
        ({"StudyDate": "2021.06.15"}, ["S2"]),
        ({"StudyDate": "20200110\\20220304"}, ["S1", "S6"]),
        ({"StudyTime": "0900-1000"}, ["S2"]),  # stored as 0930
        ({"StudyTime": "0830"}, ["S1"]),  # stored as 083000.123, minute precision
        ({"StudyTime": "08:30-08:30"}, ["S1"]),
        ({"StudyTime": "083000.2-"}, ["S2", "S3", "S4", "S5", "S6"]),
        ({"StudyTime": "-083000.1"}, ["S1"]),  # 083000.123 is within 083000.1
        ({"StudyTime": "-083000.0"}, []),
        ({"StudyTime": "1400-1430"}, ["S5"]),  # stored as 14 (hour precision)
        ({"StudyTime": "2359-"}, ["S4"]),
        ({"PatientBirthDate": "-19700101"}, ["S1", "S2"]),  # empty birth dates never match
    ],
)
def test_date_and_time_ranges(engine: Engine, keys: dict[str, str], expected: list[str]) -> None:
    assert study_ids(engine, **keys) == expected


@pytest.mark.parametrize(
    ("keys", "siim_matches"),
    [
        ({"StudyDate": "-19991231"}, SIIM_SAMPLE),  # the SIIM studies are dated 19010101
        ({"StudyDate": "19010101"}, SIIM_SAMPLE),
        ({"StudyDate": "20200101-"}, 0),
        ({"PatientID": "FIND%*"}, 0),
    ],
)
def test_matching_counts_the_siim_studies_too(
    engine: Engine, keys: dict[str, str], siim_matches: int
) -> None:
    """study_ids() shows only the synthetic studies; the SIIM ones (empty StudyID) count here."""
    matches = run(engine, STUDY, "STUDY", StudyID="", **keys)
    assert sum(1 for m in matches if not m.StudyID) == siim_matches


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("20200101-20201231", 4),  # S1 (3 instances), S3 (1)
        ("2021-", 5),  # S2 (3), S5, S6
        ("-2019", 1),  # S4
        ("20210615093000", 3),
        ("20210615093000-0500", 3),  # a single DT with a UTC offset, not a range
        ("2022", 2),
        ("2020-2021", 7),  # a range of years, not 2020 at UTC offset -20:21
    ],
)
def test_datetime_ranges(engine: Engine, value: str, expected: int) -> None:
    matches = run(
        engine,
        STUDY,
        "IMAGE",
        StudyInstanceUID="\\".join(study_uid(s.key) for _, s in all_studies()),
        SeriesInstanceUID="\\".join(
            series_uid(s.key, se.number) for _, s in all_studies() for se in s.series
        ),
        AcquisitionDateTime=value,
    )
    # SIIM series are not in the UID lists, so every match is synthetic.
    assert len(matches) == expected
    assert all(m.AcquisitionDateTime for m in matches)


@pytest.mark.parametrize(
    "keys",
    [
        {"StudyDate": "2020"},
        {"StudyDate": "20200101-20200201-20200301"},
        {"StudyDate": "-"},
        {"StudyTime": "25"},
        {"StudyTime": "1260"},
        {"StudyTime": "0930*"},
    ],
)
def test_malformed_values_are_unprocessable(keys: dict[str, str]) -> None:
    with pytest.raises(UnprocessableQueryError) as raised:
        prepare_find(identifier("STUDY", **keys), STUDY)
    (keyword,) = keys
    assert raised.value.offending == (int(Tag(keyword)),)
    assert keyword in raised.value.comment


def test_numbers_match_as_numbers(engine: Engine) -> None:
    all_synthetic = "\\".join(study_uid(s.key) for _, s in all_studies())
    series = run(engine, STUDY, "SERIES", StudyInstanceUID=all_synthetic, SeriesNumber="07")
    assert [m.SeriesNumber for m in series] == [7]
    images = run(
        engine,
        STUDY,
        "IMAGE",
        StudyInstanceUID=study_uid("S1"),
        SeriesInstanceUID=f"{series_uid('S1', 1)}\\{series_uid('S1', 2)}",
        Rows="512",
        InstanceNumber="2",
    )
    assert [(m.Rows, m.InstanceNumber) for m in images] == [(512, 2)]
    query = identifier("SERIES", StudyInstanceUID=study_uid("S1"))
    add_raw_element(query, "SeriesNumber", "IS", b"1*")
    with pytest.raises(UnprocessableQueryError) as raised:
        prepare_find(query, STUDY)
    assert raised.value.comment.startswith(("SeriesNumber", "cannot decode SeriesNumber"))


def add_raw_element(ds: Dataset, keyword: str, vr: str, raw: bytes) -> None:
    """An element as pydicom holds it after decoding a network identifier (lazy, raw)."""
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataelem import RawDataElement

    tag = tag_for_keyword(keyword)
    ds[tag] = RawDataElement(tag, vr, len(raw), raw, 0, False, True)


def test_multiple_values_and_uid_lists(engine: Engine) -> None:
    assert study_ids(engine, StudyInstanceUID=f"{study_uid('S1')}\\{study_uid('S6')}") == [
        "S1",
        "S6",
    ]
    matches = run(
        engine,
        STUDY,
        "SERIES",
        StudyInstanceUID="\\".join(study_uid(s.key) for _, s in all_studies()),
        Modality="CR\\MR",
    )
    assert sorted(m.Modality for m in matches) == ["CR", "CR", "MR"]


def test_modalities_and_sop_classes_in_study_match_any_series(engine: Engine) -> None:
    assert study_ids(engine, ModalitiesInStudy="CT") == ["S2"]
    assert study_ids(engine, ModalitiesInStudy="CT\\MR") == ["S2", "S3"]
    assert study_ids(engine, ModalitiesInStudy="D*") == ["S1", "S5", "S6"]
    ct = "1.2.840.10008.5.1.4.1.1.2"
    assert study_ids(engine, SOPClassesInStudy=ct) == ["S2"]


# --- computed keys and the response ------------------------------------------------------


def test_computed_patient_keys(engine: Engine) -> None:
    (match,) = run(
        engine,
        PATIENT,
        "PATIENT",
        PatientID="FIND%1",
        NumberOfPatientRelatedStudies="",
        NumberOfPatientRelatedSeries="",
        NumberOfPatientRelatedInstances="",
    )
    assert match.NumberOfPatientRelatedStudies == 2
    assert match.NumberOfPatientRelatedSeries == 3
    assert match.NumberOfPatientRelatedInstances == 6


def test_computed_study_and_series_keys(engine: Engine) -> None:
    (study,) = run(
        engine,
        STUDY,
        "STUDY",
        StudyInstanceUID=study_uid("S1"),
        NumberOfStudyRelatedSeries="",
        NumberOfStudyRelatedInstances="",
        ModalitiesInStudy="",
        SOPClassesInStudy="",
        NumberOfPatientRelatedStudies="",
    )
    assert study.NumberOfStudyRelatedSeries == 2
    assert study.NumberOfStudyRelatedInstances == 3
    assert list(study.ModalitiesInStudy) == ["CR", "DX"]
    assert len(study.SOPClassesInStudy) == 2
    assert study.NumberOfPatientRelatedStudies == 2
    series = run(
        engine,
        STUDY,
        "SERIES",
        StudyInstanceUID=study_uid("S1"),
        SeriesNumber="",
        NumberOfSeriesRelatedInstances="",
    )
    assert [(s.SeriesNumber, s.NumberOfSeriesRelatedInstances) for s in series] == [(1, 2), (2, 1)]


def test_response_holds_exactly_the_requested_keys(engine: Engine) -> None:
    (match,) = run(
        engine,
        STUDY,
        "STUDY",
        StudyInstanceUID=study_uid("S3"),
        PatientName="",
        StudyDate="",
        ModalitiesInStudy="",
    )
    assert sorted(match.dir()) == sorted(
        [
            "PatientName",
            "ModalitiesInStudy",
            "QueryRetrieveLevel",
            "RetrieveAETitle",
            "StudyDate",
            "StudyInstanceUID",
        ]
    )
    assert match.QueryRetrieveLevel == "STUDY"
    assert match.RetrieveAETitle == AE_TITLE
    assert match.StudyDate == "20200201"


def test_specific_character_set_only_when_needed(engine: Engine) -> None:
    matches = run(engine, PATIENT, "PATIENT", PatientID="FIND*", PatientName="")
    by_id = {str(m.PatientName): m for m in matches}
    assert by_id["Müller^Hans"].SpecificCharacterSet == "ISO_IR 192"
    assert "SpecificCharacterSet" not in by_id["DOE^JANE"]
    echoed = run(engine, PATIENT, "PATIENT", PatientID="FIND_2", SpecificCharacterSet="ISO_IR 100")
    assert echoed[0].SpecificCharacterSet == "ISO_IR 100"


def test_unsupported_keys_are_returned_empty_and_reported(engine: Engine) -> None:
    ds = identifier(
        "STUDY",
        StudyInstanceUID=study_uid("S4"),
        PatientAge="",  # an attribute its instances do not hold, asked empty: empty
        Modality="MR",  # a SERIES key in a STUDY query: ignored, reported
    )
    ds.ReferencedStudySequence = Sequence()
    ds.ProcedureCodeSequence = Sequence([Dataset()])
    ds.ProcedureCodeSequence[0].CodeValue = "X"
    prepared = prepare_find(ds, STUDY)
    assert prepared.level is Level.STUDY
    assert sorted(prepared.ignored_keys) == ["Modality", "ProcedureCodeSequence"]
    (match,) = find(engine, ds, STUDY, AE_TITLE)  # S4 is CR: Modality=MR did not filter
    for keyword in ("PatientAge", "Modality"):
        assert keyword in match and match[keyword].value in ("", None)
    assert len(match.ReferencedStudySequence) == 0
    assert len(match.ProcedureCodeSequence) == 0
    assert not prepare_find(identifier("STUDY", PatientAge=""), STUDY).ignored_keys


def test_upper_level_keys_are_returned_in_a_lower_level_query(engine: Engine) -> None:
    (match,) = run(
        engine,
        PATIENT,
        "IMAGE",
        PatientID="FIND_2",
        StudyInstanceUID=study_uid("S3"),
        SeriesInstanceUID=series_uid("S3", 1),
        PatientName="",
        StudyDescription="",
        Modality="",
        SOPInstanceUID="",
    )
    assert (match.PatientName, match.StudyDescription, match.Modality) == ("DOE^JANE", "KNEE", "MR")


def test_one_statement_per_find_whatever_it_asks(engine: Engine) -> None:
    statements: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        query = identifier(
            "STUDY",
            StudyInstanceUID="",
            ModalitiesInStudy="",
            SOPClassesInStudy="",
            NumberOfStudyRelatedSeries="",
            NumberOfStudyRelatedInstances="",
            NumberOfPatientRelatedStudies="",
            NumberOfPatientRelatedSeries="",
            NumberOfPatientRelatedInstances="",
            StudyDate="20000101-",
            PatientName="*",
        )
        matches = list(find(engine, query, STUDY, AE_TITLE))
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert len(matches) == len(all_studies()) - 1  # all but S4 (1999)
    assert len(statements) == 1


def test_synthetic_fixture_is_complete(engine: Engine) -> None:
    images = run(
        engine,
        STUDY,
        "IMAGE",
        StudyInstanceUID="\\".join(study_uid(s.key) for _, s in all_studies()),
        SeriesInstanceUID="\\".join(
            series_uid(s.key, se.number) for _, s in all_studies() for se in s.series
        ),
    )
    assert len(images) == SYNTHETIC_INSTANCE_COUNT


@pytest.fixture(scope="module")
def names_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    from node.testing.samples import small_image

    folder: Path = tmp_path_factory.mktemp("names_index")
    engine = create_index_engine(f"sqlite:///{folder / 'index.sqlite'}")
    archive = Archive(FileStore(folder / "files", fsync=False), engine)
    for number, name in enumerate(
        ["MÜLLER^HANS", "STRASSE^ANNA", "ΣΩΚΡΆΤΗΣ^ΝΊΚΟΣ", "ИВАНОВ^ИВАН", "Smith^Adam", "SMITH^Bob"]
    ):
        ds = small_image(patient_id=f"NAME-{number}", patient_name=name)
        ds.SpecificCharacterSet = "ISO_IR 192"
        archive.store_dataset(ds, is_result=False)
    yield engine
    engine.dispose()


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("müller^hans", ["MÜLLER^HANS"]),
        ("Müller*", ["MÜLLER^HANS"]),
        ("straße^anna", ["STRASSE^ANNA"]),  # case folding: ß is ss
        ("σωκράτης*", ["ΣΩΚΡΆΤΗΣ^ΝΊΚΟΣ"]),
        ("иванов^иван", ["ИВАНОВ^ИВАН"]),
        ("SMITH^A*", ["Smith^Adam"]),
        ("smith*", ["SMITH^Bob", "Smith^Adam"]),
    ],
)
def test_person_names_match_without_regard_to_case_in_any_script(
    names_engine: Engine, query: str, expected: list[str]
) -> None:
    matches = run(names_engine, PATIENT, "PATIENT", PatientName=query, PatientID="")
    assert sorted(str(m.PatientName) for m in matches) == sorted(expected)


def test_a_name_prefix_query_uses_the_folded_index(names_engine: Engine) -> None:
    prepared = prepare_find(identifier("PATIENT", PatientName="SMITH^A*"), PATIENT)
    with names_engine.connect() as conn:
        compiled = prepared.statement.compile(names_engine, compile_kwargs={"literal_binds": True})
        plan = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}").all()
    assert any("ix_patient_patient_name_folded" in str(row) for row in plan), plan


def test_any_attribute_the_files_hold_is_a_key(engine: Engine) -> None:
    """SIIM files hold PatientAge, ViewPosition and PixelSpacing, none of them an index
    column: they match and come back filled with the files' own values, at every level."""
    from pydicom import dcmread

    holders = [dcmread(p, stop_before_pixels=True) for p in siim_files()[:SIIM_SAMPLE]]
    first = holders[0]
    same_age = [h for h in holders if h.PatientAge == first.PatientAge]
    (image,) = [
        m
        for m in run(
            engine,
            STUDY,
            "IMAGE",
            PatientAge=first.PatientAge,
            SOPInstanceUID=first.SOPInstanceUID,
            PixelSpacing="",
        )
    ]
    assert [float(v) for v in image.PixelSpacing] == [float(v) for v in first.PixelSpacing]
    images = run(engine, STUDY, "IMAGE", PatientAge=first.PatientAge, SOPInstanceUID="")
    assert {m.SOPInstanceUID for m in images} == {h.SOPInstanceUID for h in same_age}
    series = run(
        engine,
        STUDY,
        "SERIES",
        ViewPosition=first.ViewPosition,
        SeriesInstanceUID=first.SeriesInstanceUID,
    )
    assert len(series) == 1 and series[0].ViewPosition == first.ViewPosition
    studies = run(
        engine, STUDY, "STUDY", PatientAge=first.PatientAge[:1] + "*", StudyInstanceUID=""
    )
    assert first.StudyInstanceUID in {m.StudyInstanceUID for m in studies}
    assert all(m.PatientAge.startswith(first.PatientAge[:1]) for m in studies)
    returned = {
        m.SOPInstanceUID: m.PixelSpacing
        for m in run(engine, STUDY, "IMAGE", ConversionType="", PixelSpacing="", SOPInstanceUID="")
        if m.PixelSpacing
    }
    for h in holders:
        assert [float(v) for v in returned[h.SOPInstanceUID]] == [float(v) for v in h.PixelSpacing]


def test_an_attribute_value_filters(engine: Engine) -> None:
    assert run(engine, STUDY, "IMAGE", PatientAge="999", SOPInstanceUID="") == []


def test_every_index_column_is_a_query_key() -> None:
    """An attribute the columns hold is kept out of instance_attribute: if the query code
    did not know it as a key, it could be neither matched nor returned."""
    from storage.indexer import COLUMN_KEYWORDS
    from storage.query.keys import KEY_SPECS

    assert COLUMN_KEYWORDS - {"SpecificCharacterSet"} <= set(KEY_SPECS)


# --- identifiers encoded from rows ------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "level", "keys"),
    [
        # Every kind of key at every level, computed keys, non-ASCII names (UTF-8).
        (PATIENT, "PATIENT", {"PatientID": "", "PatientName": "", "PatientBirthDate": "",
                              "PatientSex": "", "NumberOfPatientRelatedStudies": "",
                              "NumberOfPatientRelatedSeries": "",
                              "NumberOfPatientRelatedInstances": ""}),
        (STUDY, "STUDY", {"StudyInstanceUID": "", "StudyDate": "", "StudyTime": "",
                          "AccessionNumber": "", "StudyID": "", "StudyDescription": "",
                          "ReferringPhysicianName": "", "ModalitiesInStudy": "",
                          "SOPClassesInStudy": "", "NumberOfStudyRelatedSeries": "",
                          "NumberOfStudyRelatedInstances": "", "PatientName": ""}),
        (STUDY, "SERIES", {"SeriesInstanceUID": "", "Modality": "", "SeriesNumber": "",
                           "SeriesDescription": "", "BodyPartExamined": "",
                           "NumberOfSeriesRelatedInstances": "", "StudyDate": ""}),
        (STUDY, "IMAGE", {"SOPInstanceUID": "", "SOPClassUID": "", "InstanceNumber": "",
                          "AcquisitionDateTime": "", "Rows": "", "Columns": "",
                          "NumberOfFrames": "", "SamplesPerPixel": "",
                          "PhotometricInterpretation": ""}),
        # instance_attribute keys: binary (US), multi-valued DS, text, PN, absent ones.
        (STUDY, "IMAGE", {"SOPInstanceUID": "", "BitsAllocated": "", "PixelSpacing": "",
                          "ViewPosition": "", "PatientAge": "", "OperatorsName": "",
                          "WindowCenter": ""}),
        (STUDY, "SERIES", {"SeriesInstanceUID": "", "BitsStored": "", "PixelRepresentation": ""}),
        # Keys returned zero-length: lower levels, sequences, a retired and a private tag.
        (STUDY, "STUDY", {"StudyInstanceUID": "", "Modality": "",
                          "ReferencedStudySequence": Sequence(), "SOPInstanceUID": ""}),
        # A requested character set is returned (ISO_IR 192 when a value needs it).
        (STUDY, "STUDY", {"SpecificCharacterSet": "ISO_IR 100", "StudyInstanceUID": "",
                          "PatientName": "", "PatientID": ""}),
        (PATIENT, "PATIENT", {"SpecificCharacterSet": ["", "ISO 2022 IR 87"],
                              "PatientID": "FIND*", "PatientName": ""}),
        # Matching keys: wildcards, ranges, lists.
        (STUDY, "STUDY", {"PatientName": "d*", "StudyDate": "20200101-", "StudyInstanceUID": ""}),
    ],
)  # fmt: skip
def test_encoded_identifiers_equal_what_pydicom_writes(
    engine: Engine, model: str, level: str, keys: dict[str, object]
) -> None:
    query = identifier(level, **keys)
    query.add_new(0x00091010, "LO", "")  # a private key nobody can answer
    assert list(find(engine, query, model, AE_TITLE)), "the query should match something"
    assert_encoded_like_pydicom(engine, query, model)


def test_limited_stops_one_past_the_limit(engine: Engine) -> None:
    prepared = prepare_find(identifier("STUDY", StudyInstanceUID=""), STUDY)
    with engine.connect() as conn:
        every = list(response_datasets(prepared, conn, AE_TITLE))
        assert len(list(response_datasets(prepared.limited(2), conn, AE_TITLE))) == 3
        assert len(list(response_datasets(prepared.limited(0), conn, AE_TITLE))) == len(every)
        encoded = list(encoded_responses(prepared.limited(1), conn, AE_TITLE, implicit_vr=True))
    assert encoded == [encode(ds, True, True) for ds in every[:2]]


# --- long value lists (issue 19) ---------------------------------------------------------


def _patients(engine: Engine) -> dict[str, str]:
    """{PatientID: PatientName} of every patient in the index."""
    matches = run(engine, PATIENT, "PATIENT", PatientID="", PatientName="")
    return {m.PatientID: str(m.PatientName) for m in matches}


def test_two_thousand_patient_ids_are_matched(engine: Engine) -> None:
    """A list of 2,000 PatientIDs (SQLite used to refuse it: "Expression tree is too
    large") matches exactly the listed patients that exist; wildcards beside them too."""
    patients = _patients(engine)
    known = sorted(patients)[:3]
    wanted = [f"NOBODY-{n}" for n in range(2000 - len(known))] + known
    matches = run(engine, PATIENT, "PATIENT", PatientID="\\".join(wanted))
    assert sorted(m.PatientID for m in matches) == known
    with_wildcard = "\\".join([*wanted[:1500], f"{known[0][:-1]}?"])
    matches = run(engine, PATIENT, "PATIENT", PatientID=with_wildcard)
    assert known[0] in {m.PatientID for m in matches}


def test_two_thousand_patient_names_are_matched(engine: Engine) -> None:
    patients = _patients(engine)
    names = sorted({name for name in patients.values() if name})[:2]
    wanted = [f"NOBODY^{n}" for n in range(2000 - len(names))] + [n.lower() for n in names]
    matches = run(engine, PATIENT, "PATIENT", PatientName="\\".join(wanted))
    assert sorted(str(m.PatientName) for m in matches) == sorted(
        name for name in patients.values() if name in names
    )


def test_a_list_past_the_limit_is_refused_naming_it() -> None:
    from storage.query.identifier import failure_status
    from storage.query.matching import MAX_PATTERNS_PER_KEY, MAX_VALUES_PER_KEY

    too_many = "\\".join(f"ID{n}" for n in range(MAX_VALUES_PER_KEY + 1))
    with pytest.raises(UnprocessableQueryError) as raised:
        prepare_find(identifier("PATIENT", PatientID=too_many), PATIENT)
    assert raised.value.comment == f"PatientID: {MAX_VALUES_PER_KEY + 1} values, at most 5000"
    assert failure_status(raised.value) == 0xC000
    patterns = "\\".join(f"ID{n}*" for n in range(MAX_PATTERNS_PER_KEY + 1))
    with pytest.raises(UnprocessableQueryError) as raised:
        prepare_find(identifier("PATIENT", PatientID=patterns), PATIENT)
    assert "wildcard/range values" in raised.value.comment


# --- one answer per malformed value type (issue 19) ---------------------------------------


@pytest.mark.parametrize(
    ("keyword", "vr", "value"),
    [
        ("InstanceNumber", "IS", "x1"),  # an index column
        ("PixelSpacing", "DS", "0.1x"),  # any other attribute
        ("SliceThickness", "DS", "abc"),
        ("AcquisitionNumber", "IS", "1.5"),  # any other attribute
        ("StudyDate", "DA", "2020"),
    ],
)
def test_a_malformed_number_is_refused_like_a_malformed_date(
    keyword: str, vr: str, value: str
) -> None:
    """Before issue 19 a bad DS answered Success with no match, a bad IS 0xC000."""
    from storage.query.identifier import failure_status

    query = identifier("IMAGE")
    add_raw_element(query, keyword, vr, value.encode())
    with pytest.raises(UnprocessableQueryError) as raised:
        prepare_find(query, STUDY)
    assert raised.value.offending == (int(Tag(keyword)),)
    assert keyword in raised.value.comment
    assert failure_status(raised.value) == 0xC000


def test_well_formed_decimals_still_match_as_before(engine: Engine) -> None:
    assert isinstance(run(engine, STUDY, "IMAGE", PixelSpacing="0.1\\0.1"), list)
    assert isinstance(run(engine, STUDY, "IMAGE", SliceThickness="-1.5e3"), list)
