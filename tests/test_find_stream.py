"""The C-FIND fast path (node/dicom/find_stream.py) and query.max_results.

The fast path writes Pending responses itself, so these tests pin what it takes from
pynetdicom, check its PDUs with pynetdicom's own decoder, and then compare, on a real node,
what an SCU receives through it (Explicit and Implicit VR Little Endian, large and tiny
PDUs) with what it receives through pynetdicom's own path (Big Endian, Deflated).
"""

from __future__ import annotations

import inspect
import queue
import re
import socket
import ssl
import struct
import subprocess
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace

import pytest
from find_data import PATIENTS, all_studies, synthetic_instances
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dsutils import decode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.service_class import QueryRetrieveServiceClass
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as STUDY_ROOT
from pynetdicom.transport import AssociationSocket

from node.dicom.find_stream import PendingWriter, command_set, fast_path_implicit_vr
from node.testing.dcmtk import DCMTK_ENV, dcmtk
from node.testing.node_process import NodeProcess, start_node, wait_for_log

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR")

MAX_RESULTS = 3
STUDY_COUNT = len(all_studies())
PENDING = (0xFF00, 0xFF01)


# --- what the writer relies on in pynetdicom ---------------------------------------------


def test_pynetdicom_internals_the_writer_relies_on() -> None:
    assert callable(AssociationSocket.send)
    assert isinstance(inspect.getattr_static(DIMSEServiceProvider, "maximum_pdu_size"), property)
    assert isinstance(inspect.getattr_static(evt.Event, "is_cancelled"), property)
    # A C-CANCEL is reported once: the handler must remember it (find_scp does).
    service = QueryRetrieveServiceClass.__new__(QueryRetrieveServiceClass)
    service.assoc = SimpleNamespace(dimse=SimpleNamespace(cancel_req={5: object()}))
    assert service.is_cancelled(5) is True
    assert service.is_cancelled(5) is False


def test_fast_path_only_on_plain_tcp_and_little_endian() -> None:
    plain = socket.socket()
    dul = SimpleNamespace(event_queue=queue.Queue())
    wrapper = AssociationSocket(SimpleNamespace(dul=dul), client_socket=plain)
    assert wrapper.socket is plain  # the raw socket the writer checks for TLS

    def event(raw: object, syntax: str) -> SimpleNamespace:
        sock = SimpleNamespace(socket=raw, send=lambda data: None)
        return SimpleNamespace(
            assoc=SimpleNamespace(dul=SimpleNamespace(socket=sock)),
            context=SimpleNamespace(transfer_syntax=syntax),
        )

    try:
        assert fast_path_implicit_vr(event(plain, ImplicitVRLittleEndian)) is True
        assert fast_path_implicit_vr(event(plain, ExplicitVRLittleEndian)) is False
        assert fast_path_implicit_vr(event(plain, ExplicitVRBigEndian)) is None
        assert fast_path_implicit_vr(event(plain, DeflatedExplicitVRLittleEndian)) is None
        tls = ssl.create_default_context().wrap_socket(
            socket.socket(), server_hostname="localhost", do_handshake_on_connect=False
        )
        assert fast_path_implicit_vr(event(tls, ExplicitVRLittleEndian)) is None
        tls.close()
        assert fast_path_implicit_vr(event(None, ExplicitVRLittleEndian)) is None
    finally:
        plain.close()


def _event(max_pdu: int, sent: list[bytes]) -> SimpleNamespace:
    assoc = SimpleNamespace(
        dul=SimpleNamespace(socket=SimpleNamespace(send=sent.append)),
        dimse=SimpleNamespace(maximum_pdu_size=max_pdu),
        is_established=True,
    )
    request = SimpleNamespace(MessageID=41, AffectedSOPClassUID=STUDY_ROOT)
    return SimpleNamespace(assoc=assoc, request=request, context=SimpleNamespace(context_id=5))


def test_command_set_is_a_pending_c_find_rsp() -> None:
    command = decode(BytesIO(command_set(_event(0, []), 0xFF01)), True, True)
    assert command.CommandField == 0x8020
    assert command.MessageIDBeingRespondedTo == 41
    assert command.AffectedSOPClassUID == STUDY_ROOT
    assert command.Status == 0xFF01
    assert command.CommandDataSetType != 0x0101  # a data set follows
    assert command.CommandGroupLength == len(command_set(_event(0, []), 0xFF01)) - 12


def _pdus(stream: bytes) -> list[P_DATA_TF]:
    pdus = []
    while stream:
        length = struct.unpack(">I", stream[2:6])[0]
        pdu = P_DATA_TF()
        pdu.decode(stream[: 6 + length])
        pdus.append(pdu)
        stream = stream[6 + length :]
    return pdus


@pytest.mark.parametrize("max_pdu", [0, 16384, 128])
def test_writer_frames_pdus_as_pynetdicom_would(max_pdu: int) -> None:
    sent: list[bytes] = []
    writer = PendingWriter(_event(max_pdu, sent), 0xFF00)
    identifiers = [bytes([n]) * (40 + 70 * n) for n in range(6)]
    for identifier in identifiers:
        assert writer.write(identifier)
    assert writer.flush()
    pdus = _pdus(b"".join(sent))
    commands, data, current = 0, [], b""
    for pdu in pdus:
        assert len(pdu.presentation_data_value_items) == 1  # one PDV per PDU, as pynetdicom
        item = pdu.presentation_data_value_items[0]
        assert item.context_id == 5
        if max_pdu:
            assert pdu.pdu_length <= max_pdu
        header, fragment = item.data[0], item.data[1:]
        if header == 0x03:
            commands += 1
            assert not current
        else:
            current += fragment
            if header == 0x02:
                data.append(current)
                current = b""
    assert commands == len(identifiers)
    assert data == identifiers


# --- a real node -------------------------------------------------------------------------


def store(node: NodeProcess, datasets: list[Dataset]) -> None:
    ae = AE(ae_title="FINDSTORE")
    ae.requested_contexts = StoragePresentationContexts
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        for ds in datasets:
            assert assoc.send_c_store(ds).Status == 0x0000, ds.SOPInstanceUID
    finally:
        assoc.release()


@pytest.fixture(scope="module")
def limited_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    node = start_node(
        tmp_path_factory.mktemp("limited_node"), {"query": {"max_results": MAX_RESULTS}}
    )
    try:
        store(node, synthetic_instances())
        yield node
    finally:
        assert node.stop() == 0, node.log_text()[-3000:]


@pytest.fixture(scope="module")
def open_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    node = start_node(tmp_path_factory.mktemp("open_node"))
    try:
        store(node, synthetic_instances())
        yield node
    finally:
        assert node.stop() == 0, node.log_text()[-3000:]


def study_query(**keys: object) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for keyword in (
        "StudyInstanceUID", "PatientName", "PatientID", "StudyDate", "StudyTime",
        "AccessionNumber", "StudyDescription", "ModalitiesInStudy", "SOPClassesInStudy",
        "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "ReferringPhysicianName",
    ):  # fmt: skip
        setattr(ds, keyword, "")
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def pyfind(
    node: NodeProcess, query: Dataset, syntax: str, max_pdu: int = 16382
) -> tuple[list[Dataset], Dataset]:
    """C-FIND with pynetdicom over one transfer syntax: (identifiers, final status)."""
    ae = AE(ae_title="PYFIND")
    ae.maximum_pdu_size = max_pdu
    ae.add_requested_context(STUDY_ROOT, [syntax])
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    matches = []
    try:
        for status, identifier in assoc.send_c_find(query, STUDY_ROOT):
            assert status is not None, "no response from the node"
            if status.Status not in PENDING:
                return matches, status
            matches.append(identifier)
    finally:
        assoc.release()
    raise AssertionError("no final response")


def as_dicts(matches: list[Dataset]) -> list[dict[str, object]]:
    return [{elem.keyword: elem.value for elem in ds} for ds in matches]


SLOW_PATH = (ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian)


@pytest.mark.parametrize(
    ("syntax", "max_pdu"),
    [
        (ExplicitVRLittleEndian, 16382),
        (ImplicitVRLittleEndian, 16382),
        (ExplicitVRLittleEndian, 0),  # no limit: one PDV per identifier
        (ImplicitVRLittleEndian, 96),  # every identifier in fragments
    ],
)
def test_fast_path_answers_as_pynetdicom_does(
    open_node: NodeProcess, syntax: str, max_pdu: int
) -> None:
    query = study_query()
    reference, reference_final = pyfind(open_node, query, ExplicitVRBigEndian)
    matches, final = pyfind(open_node, query, syntax, max_pdu)
    assert reference_final.Status == final.Status == 0x0000
    assert len(matches) == STUDY_COUNT
    assert as_dicts(matches) == as_dicts(reference)
    assert any(m.get("SpecificCharacterSet") == "ISO_IR 192" for m in matches)  # Müller
    assert "go through pynetdicom" not in open_node.log_text()  # the fast path answered


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, *SLOW_PATH])
def test_max_results_sends_that_many_then_refuses(limited_node: NodeProcess, syntax: str) -> None:
    matches, final = pyfind(limited_node, study_query(), syntax)
    assert len(matches) == MAX_RESULTS
    assert final.Status == 0xA700
    assert "max_results" in final.ErrorComment
    expected, _ = pyfind(limited_node, study_query(), ExplicitVRBigEndian)
    assert as_dicts(matches) == as_dicts(expected)  # the first matches, in index order
    log = wait_for_log(limited_node, "status=0xA700")
    assert re.search(rf"matches={MAX_RESULTS} status=0xA700", log)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ExplicitVRBigEndian])
def test_max_results_matches_within_the_limit_succeed(
    limited_node: NodeProcess, syntax: str
) -> None:
    # FIND%1 has two studies, and CR is in S1 and S4: fewer than the limit, then exactly.
    first = PATIENTS[0].patient_id
    matches, final = pyfind(limited_node, study_query(PatientID=first), syntax)
    assert final.Status == 0x0000 and len(matches) == len(PATIENTS[0].studies)
    in_three = study_query(StudyDate="20200101-20210615")  # S1, S2, S3
    matches, final = pyfind(limited_node, in_three, syntax)
    assert final.Status == 0x0000 and len(matches) == MAX_RESULTS


@pytest.mark.parametrize("propose", ["-xe", "-xi", "-xb"])
def test_findscu_with_max_results(limited_node: NodeProcess, tmp_path: Path, propose: str) -> None:
    args = [dcmtk("findscu"), "-v", "-S", propose, "-aec", limited_node.ae_title, "-X"]
    args += ["-od", str(tmp_path), "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID"]
    args += ["-k", "PatientName", limited_node.host, str(limited_node.port)]
    result = subprocess.run(args, env=DCMTK_ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    log = result.stdout + result.stderr
    assert len(list(tmp_path.glob("rsp*.dcm"))) == MAX_RESULTS
    assert re.search(r"Received Final Find Response \(Refused: OutOfResources", log), log[-1500:]
