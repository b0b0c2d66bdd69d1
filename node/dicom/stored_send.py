"""C-STORE of a stored file's own bytes, without decoding it, through pynetdicom.

pynetdicom sends a dataset from a file as its encoded bytes (no dcmread, no re-encoding)
when `send_c_store` is given the file's path and `_config.STORE_SEND_CHUNKED_DATASET` is
on: it reads the file meta for the SOP UIDs and the transfer syntax, needs a context
accepted in exactly that syntax, and sends the bytes after the file meta as P-DATA
fragments of the peer's maximum PDU length. The node passes a path to `send_c_store`
only for that, so turning the option on for the process changes nothing else.

A C-MOVE or C-GET handler cannot yield a path: pynetdicom's sub-operation loop takes only
Datasets and hands each to the association's `send_c_store`. So the handler yields a
`StoredFile` (a Dataset with the instance's UIDs, which pynetdicom's loop needs, and the
path), and `send_stored_files(assoc)` puts a `send_c_store` on that one association that
turns a StoredFile back into its path. Any other Dataset goes through unchanged.

On the node's own requestor associations over plain TCP (a C-MOVE's destination, the
result sender), where nothing but the C-STORE being sent writes to the socket, the node
frames the PDUs itself, as node.dicom.find_stream does for C-FIND: the command set encoded
by pynetdicom's own message class, the stored bytes after the file meta cut to the peer's
maximum PDU length, all handed to the socket in one write, while the association reactor
is paused exactly as pynetdicom's `send_c_store` pauses it; the response is then taken from
pynetdicom's DIMSE queue as `send_c_store` takes it. pynetdicom's own path queues one
primitive per PDU for the DUL thread to encode and send: that costs about 3 ms per image.
A C-GET answers on the requester's association, where pynetdicom's DUL thread may still be
writing the previous Pending response: `serialise_writes(assoc)` makes every write to that
socket (the DUL's, one PDU each, and the node's, one whole C-STORE-RQ each) take one lock, so
that no PDU of one message falls between those of another, and framing is allowed there too.

A converted copy (storage.conversion) goes the same way: a StoredFile may carry the Part 10
bytes in memory (`content`) instead of naming a file. Where the node cannot frame (DICOM
TLS), pynetdicom sends the file from its path, or a converted copy as the Dataset read back.

This adapts pynetdicom's internals; node.dicom.pynetdicom_internals checks the code relied
on and tests/test_stored_send.py pins the behaviour.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import _config
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from node.dicom.find_stream import (
    COMMAND_LAST,
    COMMAND_MORE,
    DATA_LAST,
    DATA_MORE,
    PDV_OVERHEAD,
    pdv_header,
    plain_tcp_transport,
)
from node.dicom.reactor_wakeups import pause_reactor
from storage.structure import file_meta_end

_config.STORE_SEND_CHUNKED_DATASET = True


class StoredFile(Dataset):
    """Stands for a Part 10 file in pynetdicom's sub-operation loop: its UIDs only, and
    either the stored file's path or, for a converted copy, the file's bytes (`content`)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        sop_class: str,
        sop_instance: str,
        syntax: str,
        content: bytes | None = None,
    ) -> None:
        super().__init__()
        self.SOPClassUID = sop_class
        self.SOPInstanceUID = sop_instance
        self.stored_path = os.fspath(path)
        self.stored_syntax = syntax
        self.content = content

    def part10(self) -> bytes:
        """The whole file: the bytes in memory, else read from the stored file."""
        if self.content is not None:
            return self.content
        with open(self.stored_path, "rb") as handle:
            return handle.read()


def send_c_store(assoc: Association, dataset: Dataset | str, *args: Any, **kwargs: Any) -> Dataset:
    """`assoc.send_c_store` that sends a StoredFile from the file's bytes (framed by the
    node where its writes cannot interleave with another's, else by pynetdicom)."""
    if isinstance(dataset, StoredFile):
        if framing_allowed(assoc):
            return send_framed(assoc, dataset, *args, **kwargs)
        if dataset.content is not None:  # a converted copy: pynetdicom encodes it again
            copy = dcmread(BytesIO(dataset.content))
            return Association.send_c_store(assoc, copy, *args, **kwargs)
        dataset = dataset.stored_path
    _config.STORE_SEND_CHUNKED_DATASET = True  # a path always means "as stored"
    return Association.send_c_store(assoc, dataset, *args, **kwargs)


def framing_allowed(assoc: Association) -> bool:
    """Plain TCP, and either the node's own requestor association (nothing else writes to
    it while a C-STORE waits for its response) or one whose writes are serialised."""
    wrapper = plain_tcp_transport(assoc)
    if wrapper is None:
        return False
    return bool(assoc.is_requestor) or hasattr(wrapper, "_pneumonode_write_lock")


def serialise_writes(assoc: Association) -> None:
    """Make every write to `assoc`'s socket whole under one lock: the DUL thread's (one
    PDU per call) and the node's framed C-STOREs (one message per call). Idempotent; only
    on plain TCP (framing is not allowed on TLS anyway)."""
    wrapper = plain_tcp_transport(assoc)
    if wrapper is None or hasattr(wrapper, "_pneumonode_write_lock"):
        return
    lock = threading.Lock()
    send = wrapper.send

    def send_whole(bytestream: bytes) -> None:
        with lock:
            send(bytestream)

    wrapper.send = send_whole  # AssociationSocket.send, on this instance only
    wrapper._pneumonode_write_lock = lock


def command_set(
    stored: StoredFile,
    msg_id: int,
    priority: int,
    originator_aet: str | None,
    originator_id: int | None,
) -> bytes:
    """The encoded C-STORE-RQ command set (Implicit VR Little Endian, PS3.7 9.3.1.1), byte
    for byte what pynetdicom's `send_c_store` sends (`pynetdicom_command_set`, pinned by
    tests/test_stored_send.py) at a hundredth of pydicom's cost."""
    elements = [
        command_element(0x0002, padded_uid(stored.SOPClassUID)),
        command_element(0x0100, struct.pack("<H", C_STORE_RQ_FIELD)),
        command_element(0x0110, struct.pack("<H", msg_id)),
        command_element(0x0700, struct.pack("<H", priority)),
        command_element(0x0800, struct.pack("<H", DATA_SET_PRESENT)),
        command_element(0x1000, padded_uid(stored.SOPInstanceUID)),
    ]
    if originator_aet is not None:
        elements.append(command_element(0x1030, _padded(originator_aet, b" ")))
    if originator_id is not None:
        elements.append(command_element(0x1031, struct.pack("<H", originator_id)))
    body = b"".join(elements)
    return command_element(0x0000, struct.pack("<I", len(body))) + body


C_STORE_RQ_FIELD = 0x0001
DATA_SET_PRESENT = 0x0001  # CommandDataSetType: anything but 0x0101


def command_element(element: int, value: bytes) -> bytes:
    """One command set element, Implicit VR Little Endian (group 0000)."""
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = str(text).encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def padded_uid(uid: str) -> bytes:
    """A UI value: padded to even length with a NUL."""
    return _padded(uid, b"\0")


def pynetdicom_command_set(
    stored: StoredFile,
    msg_id: int,
    priority: int,
    originator_aet: str | None,
    originator_id: int | None,
) -> bytes:
    """The C-STORE-RQ command set as pynetdicom's own message classes encode it."""
    req = C_STORE()
    req.MessageID = msg_id
    req.Priority = priority
    req.MoveOriginatorApplicationEntityTitle = originator_aet
    req.MoveOriginatorMessageID = originator_id
    req.AffectedSOPClassUID = stored.SOPClassUID
    req.AffectedSOPInstanceUID = stored.SOPInstanceUID
    req.DataSet = BytesIO(b"\0\0")  # any data set: CommandDataSetType says one follows
    message = C_STORE_RQ()
    message.primitive_to_message(req)
    encoded = encode(message.command_set, True, True)
    if not encoded:
        raise ValueError("pynetdicom could not encode the C-STORE-RQ command set")
    return encoded


def framed(context_id: int, command: bytes, data: memoryview, max_pdu: int) -> list[bytes]:
    """The P-DATA-TF PDUs of one C-STORE-RQ, as pieces to join: the command set, then the
    data set cut to the peer's maximum PDU length (0: no limit), each PDU one PDV."""
    fragment = max(max_pdu - PDV_OVERHEAD, 1) if max_pdu else max(len(data), len(command), 1)
    pieces: list[bytes] = []
    for start in range(0, len(command), fragment):
        last = start + fragment >= len(command)
        chunk = command[start : start + fragment]
        pieces += [
            pdv_header(context_id, COMMAND_LAST if last else COMMAND_MORE, len(chunk)),
            chunk,
        ]
    for start in range(0, len(data), fragment):
        last = start + fragment >= len(data)
        chunk = data[start : start + fragment]
        pieces += [pdv_header(context_id, DATA_LAST if last else DATA_MORE, len(chunk)), chunk]
    return pieces


def send_framed(
    assoc: Association,
    stored: StoredFile,
    msg_id: int = 1,
    priority: int = 2,
    originator_aet: str | None = None,
    originator_id: int | None = None,
) -> Dataset:
    """C-STORE `stored` over `assoc` from its file's bytes, framed here (one write); the response's
    status as `send_c_store` returns it (an empty Dataset when none came)."""
    if not assoc.is_established:
        raise RuntimeError("no association to send a C-STORE on")
    data = stored.part10()
    view = memoryview(data)[file_meta_end(data) :]
    context = assoc._get_valid_context(
        stored.SOPClassUID, stored.stored_syntax, "scu", allow_conversion=False
    )
    command = command_set(stored, msg_id, priority, originator_aet, originator_id)
    pieces = framed(int(context.context_id), command, view, int(assoc.dimse.maximum_pdu_size or 0))
    pdus = b"".join(pieces)
    # Pause the reactor as send_c_store does, so that the response waits for us.
    pause_reactor(assoc)
    try:
        assoc.dul.socket.send(pdus)
        _, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    if rsp is None:
        assoc._handle_no_response()
        return Dataset()
    return assoc._check_received_status(rsp)


def send_stored_files(assoc: Association) -> None:
    """Let pynetdicom's sub-operation loop on `assoc` send StoredFiles as stored bytes."""

    def own(dataset: Dataset | str, *args: Any, **kwargs: Any) -> Dataset:
        return send_c_store(assoc, dataset, *args, **kwargs)

    assoc.send_c_store = own  # type: ignore[method-assign]


def stop_sending_stored_files(assoc: Association) -> None:
    """Give `assoc` back its own `send_c_store`."""
    with contextlib.suppress(AttributeError):
        del assoc.send_c_store


def read_ahead(paths: Iterable[str]) -> None:
    """Ask the kernel, from a background thread, to start reading these files now, so that
    they are in memory by the time they are sent (the sending waits on the network, not on
    the disk, and not on these system calls)."""
    _READER.submit(_will_need, list(paths))


def _will_need(paths: list[str]) -> None:
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # reported when it is sent
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


_READER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead")
