"""C-FIND against the real node: dcmtk's findscu and pynetdicom as clients.

Two nodes: the session's `siim_node` with the 200 SIIM images, and one started here that
holds the synthetic instances of find_data (sent with pynetdicom), whose dates, times,
names, modalities and IDs exercise every matching rule at every level in both models.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest
from find_data import (
    PATIENTS,
    SYNTHETIC_INSTANCE_COUNT,
    UID_ROOT,
    all_studies,
    series_uid,
    sop_uid,
    study_uid,
    synthetic_instances,
)
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE, StoragePresentationContexts
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind as PATIENT_ROOT,
)
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind as STUDY_ROOT,
)
from sqlalchemy import create_engine, insert

from node.testing.dcmtk import DCMTK_ENV, dcmtk
from node.testing.node_process import NodeProcess, start_node, wait_for_log
from storage.models import Patient, Study

# Query values such as 'D?' are valid C-FIND keys but not valid values; pydicom warns.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR")

SIIM_COUNT = 200
LARGE_STUDY_COUNT = 20_000
PENDING = (0xFF00, 0xFF01)


# --- clients -----------------------------------------------------------------------------


def findscu(
    node: NodeProcess, model: str, keys: list[str], out: Path, *extra: str
) -> tuple[list[Dataset], str]:
    """Run dcmtk findscu (-P or -S) with `-k` keys; the extracted responses and its log."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rsp*.dcm"):
        old.unlink()
    args = [dcmtk("findscu"), "-v", model, "-aet", "FINDTEST", "-aec", node.ae_title]
    for key in keys:
        args += ["-k", key]
    args += ["-X", "-od", str(out), *extra, node.host, str(node.port)]
    result = subprocess.run(args, env=DCMTK_ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    responses = [dcmread(path) for path in sorted(out.glob("rsp*.dcm"))]
    return responses, result.stdout + result.stderr


def final_status(findscu_log: str) -> str:
    """'Success', 'Cancel', 'Failed: IdentifierDoesNotMatchSOPClass', ... from findscu -v."""
    found = re.search(r"Received Final Find Response \(([^)]*)\)", findscu_log)
    assert found, findscu_log[-2000:]
    return found.group(1)


def client_ae() -> AE:
    ae = AE(ae_title="PYFIND")
    ae.add_requested_context(PATIENT_ROOT)
    ae.add_requested_context(STUDY_ROOT)
    return ae


def pyfind(node: NodeProcess, model, query: Dataset) -> tuple[list[Dataset], Dataset]:
    """C-FIND with pynetdicom: (pending identifiers, final status dataset)."""
    assoc = client_ae().associate(node.host, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        return collect(assoc.send_c_find(query, model))
    finally:
        assoc.release()


def collect(responses) -> tuple[list[Dataset], Dataset]:
    matches = []
    for status, identifier in responses:
        assert status is not None, "no response from the node"
        if status.Status in PENDING:
            matches.append(identifier)
        else:
            return matches, status
    raise AssertionError("no final response")


def query(level: str, **keys: object) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def tags_of(ds: Dataset) -> set[str]:
    return {elem.keyword for elem in ds}


# --- the node with synthetic instances ---------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    node = start_node(tmp_path_factory.mktemp("find_node"))
    try:
        ae = AE(ae_title="FINDSTORE")
        ae.requested_contexts = StoragePresentationContexts
        assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
        assert assoc.is_established
        for ds in synthetic_instances():
            status = assoc.send_c_store(ds)
            assert status.Status == 0x0000, ds.SOPInstanceUID
        assoc.release()
        yield node
    finally:
        assert node.stop() == 0, node.log_text()[-3000:]


ALL_SYNTHETIC_STUDIES = "\\".join(study_uid(study.key) for _, study in all_studies())


# --- dcmtk findscu -----------------------------------------------------------------------


def test_issue_command_finds_all_200_studies(siim_node: NodeProcess, tmp_path: Path) -> None:
    keys = ["QueryRetrieveLevel=STUDY", "PatientID", "StudyInstanceUID", "ModalitiesInStudy"]
    responses, log = findscu(siim_node, "-S", keys, tmp_path)
    assert final_status(log) == "Success"
    assert len(responses) == SIIM_COUNT
    assert len({r.StudyInstanceUID for r in responses}) == SIIM_COUNT
    expected = {"QueryRetrieveLevel", "RetrieveAETitle", "PatientID"}
    expected |= {"StudyInstanceUID", "ModalitiesInStudy"}
    for response in responses:
        assert tags_of(response) == expected
        assert response.ModalitiesInStudy == "CR"
        assert response.RetrieveAETitle == siim_node.ae_title
        assert response.QueryRetrieveLevel == "STUDY"


def test_findscu_patient_root_levels_on_siim(siim_node: NodeProcess, tmp_path: Path) -> None:
    patients, log = findscu(
        siim_node,
        "-P",
        ["QueryRetrieveLevel=PATIENT", "PatientID", "NumberOfPatientRelatedStudies"],
        tmp_path,
    )
    assert final_status(log) == "Success" and len(patients) == SIIM_COUNT
    assert {int(p.NumberOfPatientRelatedStudies) for p in patients} == {1}
    patient_id = patients[0].PatientID
    studies, _ = findscu(
        siim_node,
        "-P",
        ["QueryRetrieveLevel=STUDY", f"PatientID={patient_id}", "StudyInstanceUID"],
        tmp_path,
    )
    (study,) = studies
    series, _ = findscu(
        siim_node,
        "-P",
        [
            "QueryRetrieveLevel=SERIES",
            f"PatientID={patient_id}",
            f"StudyInstanceUID={study.StudyInstanceUID}",
            "SeriesInstanceUID",
            "Modality",
            "NumberOfSeriesRelatedInstances",
        ],
        tmp_path,
    )
    assert [(s.Modality, int(s.NumberOfSeriesRelatedInstances)) for s in series] == [("CR", 1)]
    images, log = findscu(
        siim_node,
        "-P",
        [
            "QueryRetrieveLevel=IMAGE",
            f"PatientID={patient_id}",
            f"StudyInstanceUID={study.StudyInstanceUID}",
            f"SeriesInstanceUID={series[0].SeriesInstanceUID}",
            "SOPInstanceUID",
            "SOPClassUID",
            "Rows",
            "Columns",
        ],
        tmp_path,
    )
    (image,) = images
    assert (image.Rows, image.Columns) == (1024, 1024)
    assert image.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"


def test_findscu_study_root_series_and_image_levels(
    synthetic_node: NodeProcess, tmp_path: Path
) -> None:
    series, log = findscu(
        synthetic_node,
        "-S",
        [
            "QueryRetrieveLevel=SERIES",
            f"StudyInstanceUID={study_uid('S1')}",
            "SeriesInstanceUID",
            "SeriesNumber",
            "Modality",
            "NumberOfSeriesRelatedInstances",
        ],
        tmp_path,
    )
    assert final_status(log) == "Success"
    found = sorted((s.SeriesNumber, s.Modality, s.NumberOfSeriesRelatedInstances) for s in series)
    assert found == [(1, "CR", 2), (2, "DX", 1)]
    images, _ = findscu(
        synthetic_node,
        "-S",
        [
            "QueryRetrieveLevel=IMAGE",
            f"StudyInstanceUID={study_uid('S2')}",
            f"SeriesInstanceUID={series_uid('S2', 3)}",
            "SOPInstanceUID",
            "InstanceNumber=2",
        ],
        tmp_path,
    )
    assert [i.SOPInstanceUID for i in images] == [sop_uid("S2", 3, 2)]


def test_findscu_wildcards_are_not_sql_wildcards(
    synthetic_node: NodeProcess, tmp_path: Path
) -> None:
    for pattern, expected in [
        ("FIND%*", {"FIND%1"}),
        ("FIND_*", {"FIND_2"}),
        ("FIND!*", {"FIND!4"}),
        ("FIND?3", {"FINDX3"}),
        ("FIND*", {p.patient_id for p in PATIENTS}),
    ]:
        responses, log = findscu(
            synthetic_node, "-P", ["QueryRetrieveLevel=PATIENT", f"PatientID={pattern}"], tmp_path
        )
        assert final_status(log) == "Success"
        assert {r.PatientID for r in responses} == expected, pattern


def test_findscu_ranges_and_uid_list(synthetic_node: NodeProcess, tmp_path: Path) -> None:
    def study_ids(*keys: str) -> list[str]:
        responses, log = findscu(
            synthetic_node, "-S", ["QueryRetrieveLevel=STUDY", "StudyID", *keys], tmp_path
        )
        assert final_status(log) == "Success"
        return sorted(r.StudyID for r in responses)

    assert study_ids("StudyDate=20200101-20201231") == ["S1", "S3"]
    assert study_ids("StudyDate=20220101-") == ["S5", "S6"]
    assert study_ids("StudyDate=-19991231") == ["S4"]
    assert study_ids("StudyTime=0900-1000") == ["S2"]
    assert study_ids(f"StudyInstanceUID={study_uid('S3')}\\{study_uid('S6')}") == ["S3", "S6"]
    assert study_ids("ModalitiesInStudy=CT\\MR") == ["S2", "S3"]


def test_findscu_relational_query_then_failure_then_next_query_works(
    synthetic_node: NodeProcess, tmp_path: Path
) -> None:
    responses, log = findscu(
        synthetic_node, "-P", ["QueryRetrieveLevel=STUDY", "StudyInstanceUID"], tmp_path
    )
    assert final_status(log) == "Success"  # Patient Root without PatientID: relational
    assert len(responses) >= 6
    responses, log = findscu(
        synthetic_node, "-S", ["QueryRetrieveLevel=STUDY", "StudyDate=2020"], tmp_path
    )
    assert final_status(log) == "Failed: UnableToProcess"
    responses, log = findscu(
        synthetic_node,
        "-P",
        ["QueryRetrieveLevel=STUDY", "PatientID=FIND_2", "StudyInstanceUID"],
        tmp_path,
    )
    assert final_status(log) == "Success"
    assert [r.StudyInstanceUID for r in responses] == [study_uid("S3")]


# --- pynetdicom: every matching type at every level, both models --------------------------

S1, S2 = study_uid("S1"), study_uid("S2")
CASES = [
    # (model, identifier keys, attribute to collect, expected values)
    (PATIENT_ROOT, {"QueryRetrieveLevel": "PATIENT", "PatientID": "FIND_2"}, "PatientID",
     ["FIND_2"]),
    (PATIENT_ROOT, {"QueryRetrieveLevel": "PATIENT", "PatientName": "doe^*"}, "PatientID",
     ["FIND_2", "FINDX3"]),
    (PATIENT_ROOT, {"QueryRetrieveLevel": "PATIENT", "PatientBirthDate": "19700101-"}, "PatientID",
     ["FIND_2", "FINDX3"]),
    (PATIENT_ROOT, {"QueryRetrieveLevel": "PATIENT", "PatientID": "FIND*", "PatientSex": "F"},
     "PatientID", ["FIND!4", "FIND_2"]),
    (PATIENT_ROOT, {"QueryRetrieveLevel": "STUDY", "PatientID": "FIND%1", "StudyDate": ""},
     "StudyDate", ["20200110", "20210615"]),
    (PATIENT_ROOT, {"QueryRetrieveLevel": "STUDY", "PatientID": "FIND%1", "StudyTime": "09-10"},
     "StudyTime", ["0930"]),
    (PATIENT_ROOT, {"QueryRetrieveLevel": "STUDY", "PatientID": "FIND%1",
                    "StudyInstanceUID": f"{S1}\\{S2}"}, "StudyInstanceUID", [S1, S2]),
    (PATIENT_ROOT, {"QueryRetrieveLevel": "STUDY", "PatientID": "FIND%1",
                    "AccessionNumber": "ACC%?"}, "AccessionNumber", ["ACC%1"]),
    (PATIENT_ROOT, {"QueryRetrieveLevel": "SERIES", "PatientID": "FIND%1", "StudyInstanceUID": S1,
                    "Modality": "D?"}, "SeriesNumber", [2]),
    (PATIENT_ROOT, {"QueryRetrieveLevel": "SERIES", "PatientID": "FIND%1", "StudyInstanceUID": S1,
                    "SeriesInstanceUID": ""}, "SeriesInstanceUID",
     [series_uid("S1", 1), series_uid("S1", 2)]),
    (PATIENT_ROOT, {"QueryRetrieveLevel": "IMAGE", "PatientID": "FIND%1", "StudyInstanceUID": S2,
                    "SeriesInstanceUID": series_uid("S2", 3), "InstanceNumber": "3"},
     "SOPInstanceUID", [sop_uid("S2", 3, 3)]),
    (PATIENT_ROOT, {"QueryRetrieveLevel": "IMAGE", "PatientID": "FIND%1", "StudyInstanceUID": S2,
                    "SeriesInstanceUID": series_uid("S2", 3),
                    "SOPInstanceUID": f"{sop_uid('S2', 3, 1)}\\{sop_uid('S2', 3, 3)}"},
     "InstanceNumber", [1, 3]),
    (STUDY_ROOT, {"QueryRetrieveLevel": "STUDY", "StudyDescription": "CHEST*"}, "StudyID",
     ["S1", "S4"]),
    # Case folding of non-ASCII letters is up to the database (SQLite folds ASCII only).
    (STUDY_ROOT, {"QueryRetrieveLevel": "STUDY", "SpecificCharacterSet": "ISO_IR 192",
                  "PatientName": "müller^HANS"}, "StudyID", ["S1", "S2"]),
    (STUDY_ROOT, {"QueryRetrieveLevel": "STUDY", "StudyDate": "20220303"}, "StudyID", ["S5"]),
    (STUDY_ROOT, {"QueryRetrieveLevel": "STUDY", "StudyTime": "1400-1500"}, "StudyID", ["S5"]),
    (STUDY_ROOT, {"QueryRetrieveLevel": "STUDY", "AccessionNumber": "ACC[?]"}, "StudyID",
     ["S5"]),
    (STUDY_ROOT, {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": ALL_SYNTHETIC_STUDIES,
                  "SeriesDescription": "*50%"}, "SeriesDescription", ["hand 50%"]),
    (STUDY_ROOT, {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": ALL_SYNTHETIC_STUDIES,
                  "SeriesDescription": "foot?1"}, "SeriesDescription", ["foot_1"]),
    (STUDY_ROOT, {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": ALL_SYNTHETIC_STUDIES,
                  "SeriesNumber": "7"}, "Modality", ["CR"]),
    (STUDY_ROOT, {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": S1,
                  "SeriesInstanceUID": series_uid("S1", 1), "Rows": 512}, "InstanceNumber",
     [1, 2]),
    (STUDY_ROOT, {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": S1,
                  "SeriesInstanceUID": f"{series_uid('S1', 1)}\\{series_uid('S1', 2)}",
                  "SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.1"}, "SOPInstanceUID",
     [sop_uid("S1", 2, 1)]),
]  # fmt: skip


@pytest.mark.parametrize(("model", "keys", "collected", "expected"), CASES)
def test_matching_types(
    synthetic_node: NodeProcess, model, keys: dict[str, str], collected: str, expected: list
) -> None:
    ds = Dataset()
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    if collected not in ds:
        setattr(ds, collected, "")
    matches, final = pyfind(synthetic_node, model, ds)
    assert final.Status == 0x0000
    assert sorted(str(m[collected].value) for m in matches) == sorted(str(v) for v in expected)
    for match in matches:
        assert tags_of(match) == tags_of(ds) | {"RetrieveAETitle"} | (
            {"SpecificCharacterSet"} if "SpecificCharacterSet" in match else set()
        )


def test_computed_keys(synthetic_node: NodeProcess) -> None:
    (patient,), _ = pyfind(
        synthetic_node,
        PATIENT_ROOT,
        query(
            "PATIENT",
            PatientID="FIND%1",
            NumberOfPatientRelatedStudies="",
            NumberOfPatientRelatedSeries="",
            NumberOfPatientRelatedInstances="",
        ),
    )
    assert patient.NumberOfPatientRelatedStudies == 2
    assert patient.NumberOfPatientRelatedSeries == 3
    assert patient.NumberOfPatientRelatedInstances == 6
    studies, _ = pyfind(
        synthetic_node,
        STUDY_ROOT,
        query(
            "STUDY",
            StudyID="",
            ModalitiesInStudy="",
            SOPClassesInStudy="",
            NumberOfStudyRelatedSeries="",
            NumberOfStudyRelatedInstances="",
        ),
    )
    by_id = {s.StudyID: s for s in studies}
    s1 = by_id["S1"]
    assert list(s1.ModalitiesInStudy) == ["CR", "DX"]
    assert (s1.NumberOfStudyRelatedSeries, s1.NumberOfStudyRelatedInstances) == (2, 3)
    assert by_id["S2"].ModalitiesInStudy == "CT"
    assert by_id["S2"].NumberOfStudyRelatedInstances == 3
    assert sum(s.NumberOfStudyRelatedInstances for s in studies) == SYNTHETIC_INSTANCE_COUNT
    assert by_id["S2"].SOPClassesInStudy == "1.2.840.10008.5.1.4.1.1.2"


def test_non_ascii_name_comes_with_its_character_set(synthetic_node: NodeProcess) -> None:
    (patient,), _ = pyfind(
        synthetic_node, PATIENT_ROOT, query("PATIENT", PatientID="FIND%1", PatientName="")
    )
    assert patient.SpecificCharacterSet == "ISO_IR 192"
    assert str(patient.PatientName) == "Müller^Hans"


def test_unsupported_key_with_a_value_gives_pending_warning(synthetic_node: NodeProcess) -> None:
    assoc = client_ae().associate(
        synthetic_node.host, synthetic_node.port, ae_title=synthetic_node.ae_title
    )
    try:
        responses = list(
            assoc.send_c_find(query("STUDY", StudyInstanceUID=S1, Modality="XA"), STUDY_ROOT)
        )
    finally:
        assoc.release()
    statuses = [status.Status for status, _ in responses]
    assert statuses == [0xFF01, 0x0000]
    assert responses[0][1].Modality in ("", None)  # a SERIES key: not matched at STUDY


def test_universal_matching_returns_all_200_studies_with_pynetdicom(
    siim_node: NodeProcess,
) -> None:
    matches, final = pyfind(
        siim_node, STUDY_ROOT, query("STUDY", StudyInstanceUID="", NumberOfStudyRelatedInstances="")
    )
    assert final.Status == 0x0000
    assert len(matches) == SIIM_COUNT
    assert {m.NumberOfStudyRelatedInstances for m in matches} == {1}


@pytest.fixture(scope="module")
def large_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """A node whose index holds LARGE_STUDY_COUNT studies, written straight into its tables.

    The node streams a match in tens of microseconds, so with 200 studies every response
    may be on the wire before a C-CANCEL arrives; with this many, cancelling provably stops
    the stream. Only the patient and study rows are needed for STUDY-level queries.
    """
    node = start_node(tmp_path_factory.mktemp("large_node"))
    engine = create_engine(node.db_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                insert(Patient.__table__),
                [
                    {"id": i, "patient_id": f"BULK{i}", "patient_name": f"BULK^{i}"}
                    for i in range(1, LARGE_STUDY_COUNT + 1)
                ],
            )
            conn.execute(
                insert(Study.__table__),
                [
                    {"patient_pk": i, "study_instance_uid": f"{UID_ROOT}.9.{i}"}
                    for i in range(1, LARGE_STUDY_COUNT + 1)
                ],
            )
    finally:
        engine.dispose()
    try:
        yield node
    finally:
        assert node.stop() == 0, node.log_text()[-3000:]


def test_cancel_stops_the_responses(large_node: NodeProcess) -> None:
    assoc = client_ae().associate(large_node.host, large_node.port, ae_title=large_node.ae_title)
    assert assoc.is_established
    try:
        identifier = query("STUDY", StudyInstanceUID="", PatientName="", StudyDate="")
        responses = assoc.send_c_find(identifier, STUDY_ROOT, msg_id=77)
        status, first = next(responses)
        assert status.Status == 0xFF00 and first is not None
        context_id = assoc._get_valid_context(STUDY_ROOT, "", "scu").context_id
        assoc.send_c_cancel(77, context_id)
        rest, final = collect(responses)
        # The association is still usable after the cancel.
        after, after_final = collect(
            assoc.send_c_find(query("STUDY", PatientID="BULK7"), STUDY_ROOT, msg_id=78)
        )
    finally:
        assoc.release()
    assert final.Status == 0xFE00
    assert 1 + len(rest) < LARGE_STUDY_COUNT
    assert after_final.Status == 0x0000 and len(after) == 1
    log = wait_for_log(large_node, "status=0xFE00")
    assert re.search(r"C-FIND study root level=STUDY matches=\d+ status=0xFE00", log)


def test_findscu_cancel(large_node: NodeProcess, tmp_path: Path) -> None:
    keys = ["QueryRetrieveLevel=STUDY", "StudyInstanceUID", "PatientID"]
    responses, log = findscu(large_node, "-S", keys, tmp_path, "--cancel", "1")
    assert final_status(log).startswith("Cancel")
    assert 1 <= len(responses) < LARGE_STUDY_COUNT


def _send_raw_find(assoc, identifier_bytes: bytes, msg_id: int = 9) -> Dataset:
    """Send a C-FIND whose identifier is the given bytes as they are; the final status.

    pynetdicom's send_c_find encodes a Dataset (and refuses bad ones), so this goes one
    layer down, pausing the association's reactor the way send_c_find does.
    """
    context_id = assoc._get_valid_context(STUDY_ROOT, "", "scu").context_id
    request = C_FIND()
    request.MessageID = msg_id
    request.AffectedSOPClassUID = STUDY_ROOT
    request.Priority = 2
    request.Identifier = BytesIO(identifier_bytes)
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    try:
        assoc.dimse.send_msg(request, context_id)
        while True:
            _, response = assoc.dimse.get_msg(block=True)
            assert response is not None, "no response"
            if response.Status not in PENDING:
                return response
    finally:
        assoc._reactor_checkpoint.set()


@pytest.mark.parametrize(
    "identifier_bytes",
    [
        b"garbage!garbage!garbage!",  # no QueryRetrieveLevel in whatever pydicom reads
        b"\x08\x00\x52\x00\x10\x00\x00\x00STU",  # truncated element
        b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY \x08\x00\x20\x00\x04\x00\x00\x002020",
    ],
)
def test_malformed_identifier_fails_and_node_keeps_serving(
    synthetic_node: NodeProcess, identifier_bytes: bytes
) -> None:
    ae = AE(ae_title="RAWFIND")
    ae.add_requested_context(STUDY_ROOT, ImplicitVRLittleEndian)  # the bytes below are implicit
    assoc = ae.associate(synthetic_node.host, synthetic_node.port, ae_title=synthetic_node.ae_title)
    assert assoc.is_established
    try:
        response = _send_raw_find(assoc, identifier_bytes)
        assert response.Status == 0xA900 or 0xC000 <= response.Status <= 0xCFFF
        assert response.ErrorComment
        # The same association still answers.
        matches, final = collect(assoc.send_c_find(query("STUDY", StudyInstanceUID=S1), STUDY_ROOT))
        assert final.Status == 0x0000 and len(matches) == 1
    finally:
        assoc.release()
    # And so does the next one.
    matches, final = pyfind(synthetic_node, STUDY_ROOT, query("STUDY", StudyInstanceUID=S2))
    assert final.Status == 0x0000 and len(matches) == 1


def test_failure_statuses_carry_a_comment(synthetic_node: NodeProcess) -> None:
    for model, identifier, status in [
        (STUDY_ROOT, query("PATIENT", PatientID=""), 0xA900),
        (STUDY_ROOT, query("STUDY", StudyTime="25"), 0xC000),
        (STUDY_ROOT, query("WRONG"), 0xA900),
    ]:
        matches, final = pyfind(synthetic_node, model, identifier)
        assert matches == []
        assert final.Status == status
        assert final.ErrorComment
    # The log names the offending key, never the value (a birth date is patient data).
    log = wait_for_log(synthetic_node, "C-FIND refused (0xC000) on StudyTime")
    assert "StudyTime 25" not in log and "'25'" not in log


def test_one_info_line_per_find_without_patient_data(synthetic_node: NodeProcess) -> None:
    before = len(synthetic_node.log_text())
    pyfind(synthetic_node, PATIENT_ROOT, query("PATIENT", PatientID="FIND_2", PatientName=""))
    line = "C-FIND patient root level=PATIENT matches=1 status=0x0000 calling AE 'PYFIND'"
    log = wait_for_log(synthetic_node, line, since=before)
    assert log.count("C-FIND ") == 1, log
    assert "DOE^JANE" not in log and "FIND_2" not in log


def test_a_strict_node_refuses_queries_without_the_upper_keys(node_factory, tmp_path) -> None:
    node = node_factory({"node": {"relational_queries": False}}, name="hierarchical")
    matches, final = pyfind(node, PATIENT_ROOT, query("SERIES", PatientID="FIND_2"))
    assert matches == [] and final.Status == 0xA900
    assert "needs a StudyInstanceUID" in final.ErrorComment
    responses, log = findscu(node, "-P", ["QueryRetrieveLevel=STUDY", "StudyInstanceUID"], tmp_path)
    assert responses == []
    assert final_status(log) == "Error: DataSetDoesNotMatchSOPClass"  # dcmtk's name for 0xA900


def test_relational_query_negotiation_is_answered_truthfully(synthetic_node, node_factory):
    from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation

    def negotiated(node) -> bytes | None:
        ae = AE(ae_title="NEGOTIATE")
        ae.add_requested_context(STUDY_ROOT)
        item = SOPClassExtendedNegotiation()
        item.sop_class_uid = STUDY_ROOT
        item.service_class_application_information = b"\x01\x01\x00\x00"
        assoc = ae.associate(node.host, node.port, ae_title=node.ae_title, ext_neg=[item])
        assert assoc.is_established
        answer = assoc.acceptor.sop_class_extended
        assoc.release()
        return answer.get(STUDY_ROOT)

    assert negotiated(synthetic_node) == b"\x01\x00\x00\x00"
    strict = node_factory({"node": {"relational_queries": False}}, name="strict_negotiation")
    assert negotiated(strict) == b"\x00\x00\x00\x00"


def test_a_list_of_2000_patient_ids_is_matched_over_the_network(
    synthetic_node: NodeProcess,
) -> None:
    """Before: 0xA700 "index unavailable" (SQLite: "Expression tree is too large")."""
    wanted = [f"N{n}" for n in range(1999)] + ["FIND%1"]
    (patient,), final = pyfind(
        synthetic_node, PATIENT_ROOT, query("PATIENT", PatientID="\\".join(wanted))
    )
    assert final.Status == 0x0000
    assert patient.PatientID == "FIND%1"


def test_a_list_past_the_limit_is_refused_over_the_network(synthetic_node: NodeProcess) -> None:
    matches, final = pyfind(
        synthetic_node,
        PATIENT_ROOT,
        query("PATIENT", PatientID="\\".join(f"N{n}" for n in range(5001))),
    )
    assert matches == [] and final.Status == 0xC000
    assert "PatientID: 5001 values, at most 5000" in str(final.get("ErrorComment", ""))
