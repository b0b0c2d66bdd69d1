"""Instances sent as stored go from their files' bytes, never decoded (node.dicom.stored_send).

In one process, so that dcmread can be watched: the node's C-GET sub-operations
(node.dicom.retrieve) on a pynetdicom C-GET SCP, retrieved by dcmtk's getscu (pynetdicom's
send from a path), and the result sender's `send` into dcmtk's storescp (PDUs framed by the
node). Both write what they receive bit for bit (`+B`): the dataset after the file meta is
the stored file's, and dcmread never opened a stored file. The command sets the node
encodes itself (C-STORE-RQ, Pending C-MOVE-RSP) are pynetdicom's, byte for byte.
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
from pynetdicom.dimse_messages import C_GET_RSP, C_MOVE_RSP
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from retrieve_data import assert_converted_pixels, dataset_bytes

import node.dicom.send_instances as send_instances
import node.dicom.stored_send as stored_send
from node.dicom.move_pending import (
    pending_command_set,
    stop_writing_pending,
    write_pending_directly,
)
from node.dicom.retrieve import Retrieve, sub_operations
from node.dicom.send_instances import prepare, send, send_without_delay
from node.dicom.stored_send import (
    StoredFile,
    command_set,
    framed,
    framing_allowed,
    pynetdicom_command_set,
    send_stored_files,
    serialise_writes,
    stop_sending_stored_files,
)
from node.testing.dcmtk import DCMTK_ENV, StoreSCP, dcmtk
from storage.conversion import encode_converted
from storage.structure import file_meta_end

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
    yield from _get_scp(stored, serialised=False)


@pytest.fixture
def serialised_get_scp(stored) -> Iterator[int]:
    """The same, with the requester's socket writes serialised as node.dicom.get_scp does:
    the node frames the C-STOREs there."""
    yield from _get_scp(stored, serialised=True)


def _get_scp(stored, serialised: bool) -> Iterator[int]:
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
        assert not framing_allowed(event.assoc)  # the requester's association: pynetdicom's path
        if serialised:
            serialise_writes(event.assoc)
            assert framing_allowed(event.assoc)
            write_pending_directly(event.assoc)
        send_stored_files(event.assoc)
        try:
            yield len(rows)
            accepted = lambda: event.assoc.accepted_contexts  # noqa: E731
            yield from sub_operations(event, context, retrieve, rows, accepted)
        finally:
            stop_sending_stored_files(event.assoc)
            stop_writing_pending(event.assoc)

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


def _getscu(port: int, folder: Path, *options: str) -> subprocess.CompletedProcess:
    args = [dcmtk("getscu"), "-S", "-aet", "GETSCU", "-aec", "STOREDSCP", *options, "+B"]
    args += ["-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=1.2.3"]
    return subprocess.run(
        [*args, "-od", str(folder), "127.0.0.1", str(port)],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_converted_copies_go_through_pynetdicom_where_the_node_cannot_frame(
    stored, get_scp: int, tmp_path: Path
) -> None:
    """Without serialised writes (as over DICOM TLS) a converted copy is read back as a
    Dataset and pynetdicom encodes it: the same pixels arrive."""
    archive, rows = stored
    result = _getscu(get_scp, tmp_path)

    assert result.returncode == 0, result.stderr
    received = {str(dcmread(p).SOPInstanceUID): p for p in tmp_path.iterdir()}
    assert sorted(received) == sorted(row.sop_instance_uid for row in rows)
    for row in rows:
        got = dcmread(received[row.sop_instance_uid])
        assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert_converted_pixels(got, Path(archive.path_of(row.file_path)))


@pytest.mark.parametrize("options", [("+xy",), ()], ids=["as-stored", "converted"])
def test_c_get_frames_on_the_requesters_association_when_writes_are_serialised(
    stored, serialised_get_scp: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options
) -> None:
    """As stored (getscu +xy) the stored bytes; converted (getscu offers only uncompressed
    syntaxes) exactly the bytes storage.conversion encodes, which hold Pillow's decode:
    both framed by the node, with pynetdicom's Pending C-GET responses written by its DUL
    thread on the same socket."""
    archive, rows = stored
    framed_sops: list[str] = []
    frame = stored_send.send_framed

    def counted(assoc, stored_file, *args, **kwargs):
        framed_sops.append(str(stored_file.SOPInstanceUID))
        return frame(assoc, stored_file, *args, **kwargs)

    monkeypatch.setattr(stored_send, "send_framed", counted)
    result = _getscu(serialised_get_scp, tmp_path, *options)

    assert result.returncode == 0, result.stderr
    received = {str(dcmread(p).SOPInstanceUID): p for p in tmp_path.iterdir()}
    assert sorted(received) == sorted(row.sop_instance_uid for row in rows)
    assert sorted(framed_sops) == sorted(received)
    for row in rows:
        source = Path(archive.path_of(row.file_path))
        got = received[row.sop_instance_uid]
        if options:
            assert dataset_bytes(got) == dataset_bytes(source)
            continue
        expected = encode_converted(dcmread(source), ExplicitVRLittleEndian)
        assert dataset_bytes(got) == expected[file_meta_end(expected) :]
        assert_converted_pixels(dcmread(got), source)


def test_the_result_sender_sends_converted_bytes_framed(stored, tmp_path: Path) -> None:
    archive, rows = stored
    scp = StoreSCP(tmp_path / "received", options=("+B",))  # uncompressed syntaxes only
    scp.start()
    try:
        ae = AE(ae_title="SENDER")
        ae.add_requested_context(SecondaryCaptureImageStorage, [JPEGBaseline8Bit])
        ae.add_requested_context(SecondaryCaptureImageStorage, [ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", scp.port, ae_title=scp.ae_title)
        assert assoc.is_established
        send_without_delay(assoc)
        try:
            outgoing = [prepare(archive, row, assoc.accepted_contexts, "X") for row in rows]
            assert all(item.converted for item in outgoing)
            codes = [send(assoc, item) for item in outgoing]
        finally:
            assoc.release()
    finally:
        scp.stop()

    assert codes == [0x0000] * COUNT
    received = {str(dcmread(p).SOPInstanceUID): p for p in scp.folder.iterdir()}
    for row, item in zip(rows, outgoing, strict=True):
        got = received[row.sop_instance_uid]
        assert dataset_bytes(got) == item.content[file_meta_end(item.content) :]


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
        send_without_delay(assoc)
        assert framing_allowed(assoc)  # the node's own requestor association: framed here
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


@pytest.mark.parametrize("sop", ["1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.12"])
@pytest.mark.parametrize(
    ("originator_aet", "originator_id"), [(None, None), ("MOVESCU", 7), ("ODD", 65535), ("N  ", 1)]
)
def test_the_command_set_is_the_one_pynetdicom_encodes(sop, originator_aet, originator_id) -> None:
    stored = StoredFile("/unused", SecondaryCaptureImageStorage, sop, JPEGBaseline8Bit)
    for msg_id, priority in [(1, 2), (65535, 0)]:
        arguments = (stored, msg_id, priority, originator_aet, originator_id)
        assert command_set(*arguments) == pynetdicom_command_set(*arguments)


def test_the_framed_pdus_cut_the_data_set_to_the_peer_maximum() -> None:
    data = memoryview(bytes(range(256)) * 100)
    command = b"\x01" * 40
    pieces = framed(3, command, data, max_pdu=16384)
    joined = b"".join(pieces)
    pdus, offset, payload = [], 0, b""
    while offset < len(joined):
        assert joined[offset : offset + 2] == b"\x04\x00"
        length = int.from_bytes(joined[offset + 2 : offset + 6], "big")
        assert length <= 16384
        pdv = joined[offset + 6 : offset + 6 + length]
        assert int.from_bytes(pdv[:4], "big") == length - 4 and pdv[4] == 3
        pdus.append(pdv[5])
        if pdv[5] in (0x00, 0x02):
            payload += pdv[6:]
        offset += 6 + length
    assert pdus == [0x03, 0x00, 0x02]
    assert payload == bytes(data)


def _pending(
    remaining: int, completed: int, failed: int, warning: int, kind: type = C_MOVE
) -> C_MOVE | C_GET:
    rsp = kind()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = (
        StudyRootQueryRetrieveInformationModelMove
        if kind is C_MOVE
        else StudyRootQueryRetrieveInformationModelGet
    )
    rsp.Status = 0xFF00
    rsp.NumberOfRemainingSuboperations = remaining
    rsp.NumberOfCompletedSuboperations = completed
    rsp.NumberOfFailedSuboperations = failed
    rsp.NumberOfWarningSuboperations = warning
    rsp.Identifier = None
    return rsp


@pytest.mark.parametrize("counts", [(199, 1, 0, 0), (0, 65000, 3, 65535)])
@pytest.mark.parametrize(("kind", "message_class"), [(C_MOVE, C_MOVE_RSP), (C_GET, C_GET_RSP)])
def test_the_pending_response_is_the_one_pynetdicom_encodes(counts, kind, message_class) -> None:
    rsp = _pending(*counts, kind=kind)
    message = message_class()
    message.primitive_to_message(rsp)

    assert pending_command_set(rsp) == encode(message.command_set, True, True)
