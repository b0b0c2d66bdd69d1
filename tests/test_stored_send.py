"""Instances sent as stored go from their files' bytes, never decoded (node.dicom.stored_send).

In one process, so that dcmread can be watched: the node's C-GET sub-operations
(node.dicom.retrieve) on a pynetdicom C-GET SCP, retrieved by dcmtk's getscu, and the result
sender's `send` into dcmtk's storescp. Both write what they receive bit for bit (`+B`): the
dataset after the file meta is the stored file's, and dcmread never opened a stored file.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pydicom.filereader
import pynetdicom.association
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, SecondaryCaptureImageStorage
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet
from retrieve_data import dataset_bytes

import node.dicom.send_instances as send_instances
from node.dicom.retrieve import Retrieve, sub_operations
from node.dicom.send_instances import prepare, send
from node.dicom.stored_send import send_stored_files, stop_sending_stored_files
from node.testing.dcmtk import DCMTK_ENV, StoreSCP, dcmtk

COUNT = 3


def _row(path: Path) -> SimpleNamespace:
    ds = dcmread(path, stop_before_pixels=True)
    return SimpleNamespace(
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        file_path=path.name,
    )


@pytest.fixture
def stored(siim_dicom_files: list[Path]) -> tuple[SimpleNamespace, list[SimpleNamespace]]:
    """An archive stand-in over the SIIM folder and index rows of its first files."""
    files = siim_dicom_files[:COUNT]
    folder = files[0].parent
    assert all(path.parent == folder for path in files)
    archive = SimpleNamespace(path_of=lambda relative: folder / relative)
    rows = [_row(path) for path in files]
    assert {row.transfer_syntax_uid for row in rows} == {JPEGBaseline8Bit}
    return archive, rows


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths dcmread is asked to read from now on, by the node or by pynetdicom."""
    paths: list[str] = []
    original = pydicom.filereader.dcmread

    def watched(fp, *args, **kwargs):
        paths.append(str(fp))
        return original(fp, *args, **kwargs)

    for module in (pydicom, pydicom.filereader, pynetdicom.association, send_instances):
        monkeypatch.setattr(module, "dcmread", watched)
    return paths


@pytest.fixture
def get_scp(stored) -> Iterator[int]:
    """A pynetdicom C-GET SCP running the node's sub-operations over `stored`."""
    archive, rows = stored
    context = SimpleNamespace(archive=archive)
    ae = AE(ae_title="STOREDSCP")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_supported_context(
        SecondaryCaptureImageStorage,
        [JPEGBaseline8Bit, ExplicitVRLittleEndian],
        scu_role=True,
        scp_role=True,
    )

    def handle_get(event: evt.Event) -> Iterator:
        retrieve = Retrieve("C-GET", event, destination="GETSCU")
        send_stored_files(event.assoc)
        try:
            yield len(rows)
            accepted = lambda: event.assoc.accepted_contexts  # noqa: E731
            yield from sub_operations(event, context, retrieve, rows, accepted)
        finally:
            stop_sending_stored_files(event.assoc)

    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_GET, handle_get)]
    )
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()


def test_c_get_as_stored_sends_the_stored_bytes_undecoded(
    stored, get_scp: int, opened: list[str], tmp_path: Path
) -> None:
    archive, rows = stored
    args = [dcmtk("getscu"), "-S", "-aet", "GETSCU", "-aec", "STOREDSCP", "+xy", "+B"]
    args += ["-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=1.2.3"]
    result = subprocess.run(
        [*args, "-od", str(tmp_path), "127.0.0.1", str(get_scp)],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    sent = [str(archive.path_of(row.file_path)) for row in rows]
    during = list(opened)

    assert result.returncode == 0, result.stderr
    received = {str(dcmread(p).SOPInstanceUID): p for p in tmp_path.iterdir()}
    assert sorted(received) == sorted(row.sop_instance_uid for row in rows)
    for row, path in zip(rows, sent, strict=True):
        got = received[row.sop_instance_uid]
        assert dcmread(got).file_meta.TransferSyntaxUID == JPEGBaseline8Bit
        assert dataset_bytes(got) == dataset_bytes(Path(path))
    assert not set(during) & set(sent), "a stored file was decoded to be sent as stored"


def test_result_sender_sends_the_stored_bytes_undecoded(
    stored, opened: list[str], tmp_path: Path
) -> None:
    archive, rows = stored
    scp = StoreSCP(tmp_path / "received", options=("+xa", "+B"))
    scp.start()
    try:
        ae = AE(ae_title="SENDER")
        ae.add_requested_context(SecondaryCaptureImageStorage, [JPEGBaseline8Bit])
        assoc = ae.associate("127.0.0.1", scp.port, ae_title=scp.ae_title)
        assert assoc.is_established
        try:
            accepted = assoc.accepted_contexts
            codes = [send(assoc, prepare(archive, row, accepted, "X")) for row in rows]
        finally:
            assoc.release()
    finally:
        scp.stop()
    sent = [str(archive.path_of(row.file_path)) for row in rows]
    during = list(opened)

    assert codes == [0x0000] * COUNT
    received = {str(dcmread(p).SOPInstanceUID): p for p in scp.folder.iterdir()}
    for row, path in zip(rows, sent, strict=True):
        assert dataset_bytes(received[row.sop_instance_uid]) == dataset_bytes(Path(path))
    assert not set(during) & set(sent), "a stored file was decoded to be sent as stored"
