"""C-GET against the real node: dcmtk's getscu and pynetdicom as requesters.

The instances come back on the requester's association, in the contexts and roles it
proposed: getscu offers the uncompressed syntaxes, so JPEG Baseline and Implicit VR
instances arrive converted to Explicit VR Little Endian and the Explicit one as stored,
bit for bit (getscu `+B`); a requester that offers JPEG Baseline only gets the JPEG
instances as stored and the others counted as failed, with the reason in the node's log.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet
from retrieve_data import (
    Item,
    assert_converted_pixels,
    build_archive,
    dataset_bytes,
    retrieve_keys,
    run_scu,
    send_as_stored,
)

from node.testing.index import stored_path
from node.testing.node_process import NodeProcess, start_node, wait_for_log


@dataclass
class Setup:
    node: NodeProcess
    items: list[Item]

    def select(self, study: int | None = None, series: int | None = None) -> list[Item]:
        """Items of the first patient: a study (1-based) and a series within it."""
        chosen = [i for i in self.items if i.patient_id == "RETRIEVE-1"]
        if study is not None:
            studies = list(dict.fromkeys(i.study for i in chosen))
            chosen = [i for i in chosen if i.study == studies[study - 1]]
        if series is not None:
            series_uids = list(dict.fromkeys(i.series for i in chosen))
            chosen = [i for i in chosen if i.series == series_uids[series - 1]]
        return chosen


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, siim_dicom_files: list[Path]) -> Iterator:
    root = tmp_path_factory.mktemp("get")
    items = build_archive(siim_dicom_files[:8], root / "archive")
    node = start_node(root / "node")
    try:
        send_as_stored(node, [item.path for item in items])
        yield Setup(node, items)
    finally:
        node.stop()


CASES = [
    ("-P", "PATIENT", dict()),
    ("-P", "STUDY", dict(study=1)),
    ("-P", "SERIES", dict(study=1, series=2)),
    ("-P", "IMAGE", dict(study=1, series=1)),
    ("-S", "STUDY", dict(study=1)),
    ("-S", "SERIES", dict(study=1, series=2)),
    ("-S", "IMAGE", dict(study=2, series=1)),
]


@pytest.mark.parametrize(("root", "level", "where"), CASES)
def test_getscu_at_every_level(setup: Setup, tmp_path: Path, root, level, where) -> None:
    wanted = setup.select(**where)
    result = run_scu(
        "getscu", setup.node, root, retrieve_keys(level, wanted, root), "+B", "-od", str(tmp_path)
    )

    assert result.returncode == 0, result.stderr
    assert "Received C-GET Response (Success)" in result.stdout + result.stderr
    received = {str(dcmread(p).SOPInstanceUID): p for p in tmp_path.iterdir()}
    assert sorted(received) == sorted(item.sop for item in wanted)
    for item in wanted:
        got = dcmread(received[item.sop])
        assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        if item.syntax == ExplicitVRLittleEndian:
            stored = stored_path(setup.node, item.sop)
            assert dataset_bytes(received[item.sop]) == dataset_bytes(stored)
        else:
            assert_converted_pixels(got, item.path)


def _c_get(
    setup: Setup, study: str, syntaxes: list[str], scp_role: bool
) -> tuple[dict[str, bytes], list]:
    """pynetdicom C-GET of a study offering Secondary Captures in `syntaxes`, with or without
    the SCP role; (SOP UID -> encoded dataset received, every response)."""
    received: dict[str, bytes] = {}

    def handle_store(event: evt.Event) -> int:
        received[str(event.request.AffectedSOPInstanceUID)] = event.encoded_dataset()[128 + 4 :]
        return 0x0000

    ae = AE(ae_title="PYGET")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(SecondaryCaptureImageStorage, syntaxes)
    roles = [build_role(SecondaryCaptureImageStorage, scp_role=True)] if scp_role else []
    assoc = ae.associate(
        setup.node.host,
        setup.node.port,
        ae_title=setup.node.ae_title,
        ext_neg=roles,
        evt_handlers=[(evt.EVT_C_STORE, handle_store)],
    )
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study
    try:
        responses = list(assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet))
    finally:
        assoc.release()
    return received, responses


def test_what_the_requester_did_not_offer_fails_with_a_reason(setup: Setup) -> None:
    study = setup.select(study=1)
    since = len(setup.node.log_text())

    received, responses = _c_get(setup, study[0].study, [JPEGBaseline8Bit], scp_role=True)

    jpegs = [item for item in study if item.syntax == JPEGBaseline8Bit]
    assert sorted(received) == sorted(item.sop for item in jpegs)
    for item in jpegs:
        stored = dataset_bytes(stored_path(setup.node, item.sop))
        assert received[item.sop].endswith(stored)
    status, identifier = responses[-1]
    assert status.Status == 0xB000
    assert (status.NumberOfCompletedSuboperations, status.NumberOfFailedSuboperations) == (2, 2)
    others = sorted(item.sop for item in study if item.syntax != JPEGBaseline8Bit)
    assert sorted(identifier.FailedSOPInstanceUIDList) == others
    log = wait_for_log(setup.node, "failed=2", since=since)
    assert log.count("PYGET takes only JPEG Baseline (Process 1)") == 2


def test_no_sub_operation_without_the_scp_role(setup: Setup) -> None:
    study = setup.select(study=2)
    since = len(setup.node.log_text())

    received, responses = _c_get(setup, study[0].study, [ExplicitVRLittleEndian], scp_role=False)

    assert received == {}
    status, identifier = responses[-1]
    assert status.Status == 0xA702  # every sub-operation failed
    assert identifier.FailedSOPInstanceUIDList == study[0].sop
    wait_for_log(setup.node, "PYGET took no context for Secondary Capture", since=since)


def test_a_get_without_its_unique_key_is_a900(setup: Setup) -> None:
    received, responses = _c_get(setup, "", [ExplicitVRLittleEndian], scp_role=True)

    assert received == {}
    status, _ = responses[-1]
    assert status.Status == 0xA900
    assert "StudyInstanceUID" in status.ErrorComment
