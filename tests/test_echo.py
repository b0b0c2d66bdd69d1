"""C-ECHO against the real node, with dcmtk's echoscu and with pynetdicom."""

from __future__ import annotations

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from node.testing.dcmtk import echo
from node.testing.node_process import NodeProcess, wait_for_log


def test_echoscu_succeeds(node: NodeProcess) -> None:
    assert echo(node.host, node.port, node.ae_title)


def test_pynetdicom_echo_and_association_log(node: NodeProcess) -> None:
    ae = AE(ae_title="ECHOTEST")
    ae.add_requested_context(Verification)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    status = assoc.send_c_echo()
    assoc.release()
    assert status.Status == 0x0000
    log = wait_for_log(node, "association released: calling AE 'ECHOTEST'")
    assert "association accepted: calling AE 'ECHOTEST'" in log
    assert "association released: calling AE 'ECHOTEST'" in log
