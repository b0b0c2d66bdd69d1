"""The behaviours of pynetdicom that the C-MOVE and C-GET handlers rely on (node.dicom.retrieve,
node.dicom.move_scp), pinned in one process so that an upgrade that changes them fails here.

- A yielded dataset without file meta (`unsendable`) is a failed sub-operation: nothing
  is sent, and its SOP Instance UID is in the Failed SOP Instance UID List.
- A failure status yielded after the number of sub-operations reaches the requester with
  its ErrorComment.
- EVT_ACCEPTED of a requested association fires before `AE.associate` returns, so the
  C-MOVE handler knows the destination's accepted contexts before it prepares anything.
- `Association.dul.socket.socket` is the TCP socket of both ends (send_without_delay).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet, Verification

from node.dicom.dimse import status_dataset
from node.dicom.retrieve import refuse, unsendable
from node.dicom.send_instances import send_without_delay

UID_ROOT = "1.2.826.0.1.3680043.8.498.90418."


def _sendable(number: int) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = f"{UID_ROOT}{number}"
    ds.PatientID = "PIN"
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.set_original_encoding(False, True)
    return ds


@pytest.fixture
def get_scp() -> Iterator[tuple[int, list]]:
    """A pynetdicom C-GET SCP whose handler yields what the test puts in `script`."""
    script: list = []
    ae = AE(ae_title="PINSCP")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_supported_context(
        SecondaryCaptureImageStorage, [ExplicitVRLittleEndian], scu_role=True, scp_role=True
    )

    def handle_get(event: evt.Event) -> Iterator:
        yield from script

    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_GET, handle_get)]
    )
    try:
        yield int(server.server_address[1]), script
    finally:
        server.shutdown()


def _c_get(port: int) -> tuple[list[Dataset], Dataset, Dataset | None]:
    """C-GET as a requester that stores Secondary Captures: (stored, final status, its
    identifier)."""
    stored: list[Dataset] = []

    def handle_store(event: evt.Event) -> int:
        stored.append(event.dataset)
        return 0x0000

    ae = AE(ae_title="PINSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(SecondaryCaptureImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title="PINSCP",
        ext_neg=[build_role(SecondaryCaptureImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, handle_store)],
    )
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = UID_ROOT + "0"
    try:
        responses = list(assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet))
    finally:
        assoc.release()
    status, identifier = responses[-1]
    return stored, status, identifier


def test_a_stand_in_without_file_meta_is_a_failed_sub_operation(get_scp) -> None:
    port, script = get_scp
    refused = SimpleNamespace(
        sop_class_uid=SecondaryCaptureImageStorage, sop_instance_uid=UID_ROOT + "2"
    )
    script.extend([2, (0xFF00, _sendable(1)), (0xFF00, unsendable(refused))])

    stored, status, identifier = _c_get(port)

    assert [ds.SOPInstanceUID for ds in stored] == [UID_ROOT + "1"]
    assert status.Status == 0xB000
    assert status.NumberOfCompletedSuboperations == 1
    assert status.NumberOfFailedSuboperations == 1
    assert identifier.FailedSOPInstanceUIDList == UID_ROOT + "2"


def test_a_failure_status_after_the_count_reaches_the_requester(get_scp) -> None:
    port, script = get_scp
    script.extend(refuse(status_dataset(0xA900, "a retrieve needs a StudyInstanceUID")))

    stored, status, _ = _c_get(port)

    assert stored == []
    assert status.Status == 0xA900
    assert status.ErrorComment == "a retrieve needs a StudyInstanceUID"


def test_accepted_fires_before_associate_returns_and_sockets_are_reachable() -> None:
    scp = AE(ae_title="PINECHO")
    scp.add_supported_context(Verification)
    server = scp.start_server(("127.0.0.1", 0), block=False)
    port = int(server.server_address[1])
    seen: list = []
    acceptor_sockets: list[socket.socket] = []

    def acceptor_side(event: evt.Event) -> None:
        send_without_delay(event.assoc)
        acceptor_sockets.append(event.assoc.dul.socket.socket)

    server.bind(evt.EVT_ACCEPTED, acceptor_side)
    try:
        ae = AE(ae_title="PINSCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate(
            "127.0.0.1",
            port,
            evt_handlers=[(evt.EVT_ACCEPTED, lambda e: seen.append(e.assoc.accepted_contexts))],
        )
        contexts_when_returned = list(seen)
        send_without_delay(assoc)
        requestor_socket = assoc.dul.socket.socket
        assert requestor_socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert acceptor_sockets[0].getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assoc.release()
    finally:
        server.shutdown()
    assert len(contexts_when_returned) == 1
    assert [cx.abstract_syntax for cx in contexts_when_returned[0]] == [Verification]
