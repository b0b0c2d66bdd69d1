"""A C-MOVE that lasts longer than `node.network_timeout`, against a slow destination.

The caller is silent while the node works for it: its association must live as long as the
node's work does, and only the peer's silence while the node waits for it may end it. A
destination slower than `network_timeout` fails its sub-operations: the log must count them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
)
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as Get
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as Move
from retrieve_data import Item, build_archive, retrieve_keys, run_scu, send_as_stored

from node.testing.node_process import NodeProcess, start_node, wait_for_log

NETWORK_TIMEOUT = 2.0


class SlowDestination:
    """A Storage SCP that takes `delay` seconds to answer each C-STORE."""

    def __init__(self, ae_title: str) -> None:
        self.delay = 0.0
        self.received: list[str] = []
        ae = AE(ae_title=ae_title)
        ae.add_supported_context(
            SecondaryCaptureImageStorage,
            [JPEGBaseline8Bit, ExplicitVRLittleEndian, ImplicitVRLittleEndian],
        )
        ae.network_timeout = 30
        ae.dimse_timeout = 30
        self.server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        self.port = int(self.server.server_address[1])

    def _store(self, event: evt.Event) -> int:
        time.sleep(self.delay)
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000


@dataclass
class Setup:
    node: NodeProcess
    study: list[Item]
    slow: SlowDestination


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, siim_dicom_files: list[Path]) -> Iterator:
    root = tmp_path_factory.mktemp("long-retrieve")
    items = build_archive(siim_dicom_files[:5], root / "archive")
    slow = SlowDestination("SLOW")
    node = None
    try:
        peers = [{"ae_title": "SLOW", "host": "127.0.0.1", "port": slow.port}]
        node = start_node(
            root / "node", {"node": {"network_timeout": NETWORK_TIMEOUT}, "peers": peers}
        )
        send_as_stored(node, [item.path for item in items])
        study = [item for item in items if item.study == items[0].study]
        assert len(study) == 4
        yield Setup(node, study, slow)
    finally:
        if node is not None:
            node.stop()
        slow.server.shutdown()


def test_a_move_longer_than_the_network_timeout_keeps_its_association(setup: Setup) -> None:
    setup.slow.delay = 0.8  # 4 images: ~3.2 s of work for the node, the caller silent
    setup.slow.received.clear()
    since = len(setup.node.log_text())

    started = time.monotonic()
    result = run_scu(
        "movescu", setup.node, "-S", retrieve_keys("STUDY", setup.study, "-S"), "-aem", "SLOW"
    )
    took = time.monotonic() - started

    output = result.stdout + result.stderr
    assert took > NETWORK_TIMEOUT  # the case this test is about
    assert result.returncode == 0, output[-2000:]
    assert "Received Final Move Response (Success)" in output
    assert "Peer aborted" not in output
    assert sorted(setup.slow.received) == sorted(item.sop for item in setup.study)
    log = wait_for_log(setup.node, "completed=4", since=since)
    assert "Network timeout reached" not in log


def test_the_caller_may_think_a_moment_after_a_long_move(setup: Setup) -> None:
    """After a move longer than the timeout, the caller's association is as fresh as after
    any answer: it can wait a little and ask again (no race with an A-RELEASE-RQ here)."""
    setup.slow.delay = 0.8
    ae = AE(ae_title="PYMOVE")
    ae.add_requested_context(Move)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate(setup.node.host, setup.node.port, ae_title=setup.node.ae_title)
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = setup.study[0].study
    try:
        responses = list(assoc.send_c_move(query, "SLOW", Move))
        assert responses[-1][0].Status == 0x0000
        time.sleep(NETWORK_TIMEOUT / 4)
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        if assoc.is_established:
            assoc.release()


def test_a_get_longer_than_the_network_timeout_keeps_its_association(setup: Setup) -> None:
    """C-GET: the caller stores each instance itself, slowly; the node waits for it, but
    only for each answer, never for the whole retrieve."""
    received: list[str] = []

    def store(event: evt.Event) -> int:
        time.sleep(0.8)
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    ae = AE(ae_title="PYGET")
    ae.add_requested_context(Get)
    ae.add_requested_context("1.2.840.10008.1.1")
    syntaxes = [JPEGBaseline8Bit, ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    ae.add_requested_context(SecondaryCaptureImageStorage, syntaxes)
    role = build_role(SecondaryCaptureImageStorage, scp_role=True)
    assoc = ae.associate(
        setup.node.host,
        setup.node.port,
        ae_title=setup.node.ae_title,
        ext_neg=[role],
        evt_handlers=[(evt.EVT_C_STORE, store)],
    )
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = setup.study[0].study
    try:
        started = time.monotonic()
        responses = list(assoc.send_c_get(query, Get))
        assert time.monotonic() - started > NETWORK_TIMEOUT
        assert responses[-1][0].Status == 0x0000
        time.sleep(NETWORK_TIMEOUT / 4)
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        if assoc.is_established:
            assoc.release()
    assert sorted(received) == sorted(item.sop for item in setup.study)


def test_a_silent_caller_is_still_dropped_after_the_network_timeout(setup: Setup) -> None:
    """What the timeout is for: a caller that says nothing while the node waits for it."""
    ae = AE(ae_title="SILENT")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(setup.node.host, setup.node.port, ae_title=setup.node.ae_title)
    assert assoc.is_established
    deadline = time.monotonic() + NETWORK_TIMEOUT + 10
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.1)
    assert assoc.is_aborted


def test_a_destination_slower_than_the_timeout_fails_every_sub_operation_counted(
    setup: Setup,
) -> None:
    setup.slow.delay = NETWORK_TIMEOUT + 1.5  # the node gives up waiting for each answer
    since = len(setup.node.log_text())
    ae = AE(ae_title="PYMOVE")
    ae.add_requested_context(Move)
    ae.dimse_timeout = 60
    assoc = ae.associate(setup.node.host, setup.node.port, ae_title=setup.node.ae_title)
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = setup.study[0].study
    try:
        responses = list(assoc.send_c_move(query, "SLOW", Move))
    finally:
        assoc.release()

    status, identifier = responses[-1]
    assert status.Status == 0xA702
    assert status.NumberOfFailedSuboperations == 4
    assert sorted(identifier.FailedSOPInstanceUIDList) == sorted(i.sop for i in setup.study)
    log = wait_for_log(setup.node, "failed=4", since=since)
    assert "completed=0" in log
    assert "status=0xA702" in log
    assert "has no attribute 'Status'" not in setup.node.log_text()[since:]
