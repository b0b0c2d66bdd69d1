"""Every log line is one line: values a peer controls cannot write records of their own.

A peer sends control characters in every field it controls that the node or its libraries
may log: the calling and called AE titles, the Affected SOP Instance UID of a C-STORE
request, the dataset's SOP Instance UID, Patient ID and Name, and the move destination of
a C-MOVE. The node's log then holds no line that starts with the text the peer forged.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, _config
from pynetdicom.sop_class import (
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from node.testing.node_process import NodeProcess, wait_for_log

FORGED = "2026-01-01 00:00:00,000 INFO forged"
FORGED_UID = f"1.2.3\n{FORGED}\r"


@pytest.fixture
def lax_pynetdicom() -> Iterator[None]:
    """Let this test's pynetdicom send values it would refuse to send."""
    validators = dict(_config.VALIDATORS)
    _config.VALIDATORS["AE"] = lambda value: (True, "")
    _config.VALIDATORS["UI"] = lambda value: (True, "")
    try:
        yield
    finally:
        _config.VALIDATORS.clear()
        _config.VALIDATORS.update(validators)


def test_control_characters_from_a_peer_stay_inside_their_line(
    node: NodeProcess, siim_dicom_files: list[Path], lax_pynetdicom: None
) -> None:
    titles = [("EVIL\n2026-01-01", node.ae_title), ("\r\n2026-01-01\x1b", node.ae_title)]
    titles.append(("HONEST", "X\n2026-01-01"))  # the called AE title
    for calling, called in titles:
        ae = AE(ae_title=calling)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = ae.associate(node.host, node.port, ae_title=called)
        if assoc.is_established:
            assoc.release()
    ae = AE(ae_title="HONEST")
    ae.add_requested_context(SecondaryCaptureImageStorage, "1.2.840.10008.1.2.4.50")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    ds = dcmread(siim_dicom_files[0])
    ds.SOPInstanceUID = FORGED_UID
    ds.PatientID = f"P\n{FORGED}"
    ds.PatientName = f"N\r\n{FORGED}"
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        assoc.send_c_store(ds)
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = FORGED_UID
        query.PatientID = f"\n{FORGED}"
        list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
        move = StudyRootQueryRetrieveInformationModelMove
        list(assoc.send_c_move(query, f"D\n{FORGED}"[:16], move))  # pynetdicom aborts
    finally:
        if assoc.is_established:
            assoc.release()
    wait_for_log(node, "calling AE 'HONEST' from")  # released, or aborted for the move

    log = node.log_text()
    assert "\\n2026-01-01" in log  # the values were logged, escaped
    assert not [line for line in log.splitlines() if line.startswith("2026-01-01")], log
