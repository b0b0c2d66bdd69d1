"""Durability and shutdown: an acknowledged instance survives kill -9; SIGTERM and SIGINT
stop the node cleanly, letting an open association finish first."""

from __future__ import annotations

import signal
import subprocess
import threading
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import JPEGBaseline8Bit
from pynetdicom import AE
from pynetdicom.sop_class import SecondaryCaptureImageStorage
from sqlalchemy import select

from node.testing.dcmtk import DCMTK_ENV, dcmtk
from node.testing.index import index_connection
from node.testing.node_process import NodeProcess, restart_node, wait_for_log
from storage.models import Instance

KILL_AFTER_ACKNOWLEDGED = 40


def indexed_files(node: NodeProcess) -> dict[str, str]:
    with index_connection(node.db_url) as conn:
        rows = conn.execute(select(Instance.sop_instance_uid, Instance.file_path))
        return {sop: path for sop, path in rows}


def test_kill_9_loses_no_acknowledged_instance(node_factory, siim_dicom_files) -> None:
    node = node_factory(name="crash")
    sources = {}
    for path in siim_dicom_files[:120]:
        ds = dcmread(path)
        sources[ds.SOPInstanceUID] = ds
    ae = AE(ae_title="CRASHTEST")
    # pynetdicom notices a dead peer mid-message only by its timeouts.
    ae.dimse_timeout = ae.network_timeout = 3
    ae.add_requested_context(SecondaryCaptureImageStorage, [JPEGBaseline8Bit])
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    acknowledged: list[str] = []
    killer: threading.Timer | None = None
    for sop, ds in sources.items():
        if not assoc.is_established:
            break
        status = assoc.send_c_store(ds)
        if status.get("Status") == 0x0000:
            acknowledged.append(sop)
        if len(acknowledged) == KILL_AFTER_ACKNOWLEDGED and killer is None:
            # Kill while the next instance is on its way or being stored.
            killer = threading.Timer(0.002, node.kill)
            killer.start()
    assert killer is not None
    killer.join()
    if assoc.is_established:
        assoc.abort()
    assert KILL_AFTER_ACKNOWLEDGED <= len(acknowledged) < len(sources)

    leftover = node.storage / "files" / ".incoming-crash.tmp"
    leftover.write_bytes(b"half a file")
    again = restart_node(node)
    try:
        indexed = indexed_files(again)
        for sop in acknowledged:
            assert sop in indexed, f"acknowledged {sop} is not in the index"
            stored = dcmread(again.storage / "files" / indexed[sop])
            assert stored.SOPInstanceUID == sop
            assert stored.PixelData == sources[sop].PixelData
        for relative in indexed.values():
            assert (again.storage / "files" / relative).is_file()
        assert not leftover.exists(), "temporary files are cleaned up at start"
        assert "removed 1 temporary files" in again.log_text()
    finally:
        assert again.stop() == 0


def test_sigterm_and_sigint_stop_an_idle_node(node_factory) -> None:
    for sig, name in ((signal.SIGTERM, "term"), (signal.SIGINT, "int")):
        node = node_factory(name=name)
        assert node.stop(sig) == 0
        log = node.log_text()
        assert f"received {signal.Signals(sig).name}, stopping" in log
        assert "stopped" in log and "Traceback" not in log


def test_sigterm_lets_the_open_association_finish(
    node_factory, siim_path: Path, siim_dicom_files
) -> None:
    node = node_factory(name="busy")
    sender = subprocess.Popen(
        [dcmtk("storescu"), "-xy", "-aec", node.ae_title, node.host, str(node.port)]
        + ["+sd", "+r", str(siim_path / "train")],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_log(node, "stored SOP", timeout=60)
    node.process.send_signal(signal.SIGTERM)
    assert sender.poll() is None, "the association must still be open when SIGTERM arrives"
    assert sender.wait(timeout=120) == 0
    assert node.process.wait(timeout=60) == 0
    node.stopped = True
    assert len(indexed_files(node)) == len(siim_dicom_files)
    assert "association released" in wait_for_log(node, "stopped")
