"""Sending stored instances to an AE: the one path for C-MOVE, C-GET and the result sender.

Three steps, each shared:
- `connection_arguments`: how to reach a peer (its AE title, DICOM TLS when it has
  `tls = true`) and the presentation contexts a set of stored instances needs. Each SOP
  class is proposed once per stored transfer syntax, and once more with the uncompressed
  Little Endian syntaxes, so a receiver that refuses the stored syntax can still take a
  converted copy (dcmtk's storescu proposes in the same way).
- `prepare`: once the receiver has answered, what to send for one instance: its stored
  file, sent from its bytes without decoding (node.dicom.stored_send), when its syntax was
  accepted; else a copy converted (storage.conversion) to an accepted uncompressed syntax,
  as Part 10 bytes in memory that go out framed the same way; else the reason it cannot
  go, for the caller to report as a failure. `PreparedAhead` runs `prepare` in worker
  threads a few instances ahead of the sending, in order, so that decoding (which releases
  the GIL) overlaps the sending.
- `send`: the C-STORE itself, for callers that drive the association (the result sender);
  C-MOVE and C-GET hand `Outgoing.payload` to pynetdicom's sub-operation loop instead.

Every association that carries instances or retrieve responses sends without Nagle's
algorithm (`send_without_delay`), as dcmtk does with TCP_NODELAY=1.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from pydicom import dcmread
from pydicom.uid import UID
from pynetdicom import AE, build_context
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from node.config import Config, Peer
from node.dicom.reactor_wakeups import wake_requestor
from node.dicom.stored_send import StoredFile
from node.dicom.stored_send import send_c_store as send_stored
from node.dicom.tls import client_context
from storage.archive import Archive
from storage.conversion import (
    CONVERSION_TARGETS,
    ConversionError,
    choose_syntax,
    encode_converted,
)

# An A-ASSOCIATE-RQ holds at most 128 presentation contexts (odd IDs 1-255).
MAX_CONTEXTS = 128
PREPARE_AHEAD = 4  # instances prepared (converted) ahead of the one being sent
_PREPARERS = ThreadPoolExecutor(
    max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="prepare-ahead"
)


class StoredInstance(Protocol):
    """What the index says about an instance to send (a query row, a due delivery)."""

    @property
    def sop_instance_uid(self) -> str: ...

    @property
    def sop_class_uid(self) -> str: ...

    @property
    def transfer_syntax_uid(self) -> str: ...

    @property
    def file_path(self) -> str: ...


@dataclass(frozen=True)
class Outgoing:
    """One instance made ready for a given association, or the reason it cannot be sent."""

    instance: StoredInstance
    content: bytes | None = None  # a converted copy, as a Part 10 file
    syntax: str = ""  # the transfer syntax it goes in
    refusal: str = ""
    stored_path: str = ""  # the file whose bytes go as stored

    @property
    def converted(self) -> bool:
        return self.content is not None and self.syntax != self.instance.transfer_syntax_uid

    @property
    def payload(self) -> StoredFile | None:
        """What pynetdicom's sub-operation loop sends (on an association set up with
        stored_send.send_stored_files): a StoredFile naming the stored file or carrying the
        converted copy; None if refused."""
        if self.refusal:
            return None
        instance = self.instance
        return StoredFile(
            self.stored_path,
            instance.sop_class_uid,
            instance.sop_instance_uid,
            self.syntax,
            self.content,
        )

    def describe(self) -> str:
        """' as <syntax>, converted from <syntax>' for a log line; '' when sent as stored."""
        if not self.converted:
            return ""
        stored = UID(self.instance.transfer_syntax_uid)
        return f" as {UID(self.syntax).name}, converted from {stored.name}"


def requested_contexts(instances: Iterable[StoredInstance]) -> list[PresentationContext]:
    """The contexts to propose for `instances`: per SOP class one for each stored syntax,
    and one with the uncompressed Little Endian syntaxes for converted copies.

    Past 128 contexts the uncompressed ones come first (any instance can go converted),
    then the stored syntaxes of the most instances.
    """
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for instance in instances:
        counts[(instance.sop_class_uid, instance.transfer_syntax_uid)] += 1
    sop_classes = dict.fromkeys(sop_class for sop_class, _ in counts)
    fallback = [build_context(sop_class, list(CONVERSION_TARGETS)) for sop_class in sop_classes]
    by_use = sorted(counts, key=lambda pair: -counts[pair])
    own = [build_context(sop_class, [syntax]) for sop_class, syntax in by_use]
    return (fallback + own)[:MAX_CONTEXTS]


def connection_arguments(
    config: Config, peer: Peer, instances: Sequence[StoredInstance]
) -> dict[str, Any]:
    """Keyword arguments of `AE.associate` for sending `instances` to `peer`."""
    tls_args = (client_context(config.tls), peer.host) if peer.tls else None
    return {
        "ae_title": peer.ae_title,
        "contexts": requested_contexts(instances),
        "tls_args": tls_args,
    }


def send_without_delay(assoc: Association) -> None:
    """Turn Nagle's algorithm off on the association's socket (pynetdicom leaves it on),
    and, on the node's own requestor associations, let the DUL wake on work.

    With Nagle on, a small PDU (a Pending C-MOVE response, the last fragment of a dataset)
    that follows another waits for the peer's delayed ACK, about 40 ms: that was most of
    the time of a C-MOVE of small images. Without the wake-ups each C-STORE sent waits up to
    a millisecond for the DUL to notice it, and again for the response
    (`node.dicom.reactor_wakeups`, which also closes the pynetdicom race this exposes).
    """
    if assoc.is_requestor:
        wake_requestor(assoc)
    transport = assoc.dul.socket
    sock = transport.socket if transport is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def requestor_ae(config: Config) -> AE:
    """An AE calling out as the node, with the node's timeouts."""
    ae = AE(ae_title=config.node.ae_title)
    ae.network_timeout = config.node.network_timeout
    ae.acse_timeout = config.node.network_timeout
    ae.dimse_timeout = config.node.network_timeout
    return ae


def _accepted_syntaxes(contexts: Iterable[PresentationContext], sop_class: str) -> list[str]:
    """Transfer syntaxes accepted for `sop_class` in which the node may send (SCU role)."""
    return [
        str(cx.transfer_syntax[0])
        for cx in contexts
        if cx.abstract_syntax == sop_class and cx.as_scu
    ]


def prepare(
    archive: Archive,
    instance: StoredInstance,
    accepted: Iterable[PresentationContext],
    receiver: str,
) -> Outgoing:
    """What to send `instance` as over an association that accepted `accepted`."""
    sop_class = UID(instance.sop_class_uid)
    offered = _accepted_syntaxes(accepted, sop_class)
    if not offered:
        return Outgoing(instance, refusal=f"{receiver} took no context for {sop_class.name}")
    syntax = choose_syntax(instance.transfer_syntax_uid, offered)
    if syntax is None:
        names = ", ".join(sorted({UID(s).name for s in offered}))
        stored = UID(instance.transfer_syntax_uid).name
        return Outgoing(
            instance, refusal=f"{receiver} takes only {names}; {stored} does not convert"
        )
    path = archive.path_of(instance.file_path)
    try:
        if syntax == instance.transfer_syntax_uid:
            os.stat(path)  # there; its bytes are read as they are sent
            return Outgoing(instance, syntax=str(syntax), stored_path=str(path))
        dataset = dcmread(path)
    except Exception as exc:  # OSError, or a file changed behind the index's back
        return Outgoing(instance, refusal=f"stored file unreadable: {type(exc).__name__}")
    try:
        content = encode_converted(dataset, syntax)
    except ConversionError as exc:
        return Outgoing(instance, refusal=f"not convertible for {receiver}: {exc}")
    return Outgoing(instance, content, syntax=str(syntax))


def send(assoc: Association, outgoing: Outgoing) -> int | None:
    """C-STORE a prepared instance; its response status, or None if none came (timeout,
    abort). Raises ValueError for an instance that was refused."""
    if outgoing.refusal:
        raise ValueError(f"SOP {outgoing.instance.sop_instance_uid}: {outgoing.refusal}")
    status = send_stored(assoc, outgoing.payload)
    return getattr(status, "Status", None)


class PreparedAhead:
    """The instances' Outgoings in order, each prepared in a worker thread while earlier
    ones are sent, at most `depth` at a time (what is decoded waits in memory)."""

    def __init__(
        self,
        prepare_one: Callable[[StoredInstance], Outgoing],
        instances: Sequence[StoredInstance],
        depth: int = PREPARE_AHEAD,
        pool: ThreadPoolExecutor | None = None,
    ) -> None:
        self._prepare = prepare_one
        self._upcoming = iter(instances)
        self._depth = max(1, depth)
        self._pool = pool or _PREPARERS
        self._pending: deque[Future[Outgoing]] = deque()

    def _top_up(self) -> None:
        while len(self._pending) < self._depth:
            instance = next(self._upcoming, None)
            if instance is None:
                return
            self._pending.append(self._pool.submit(self._prepare, instance))

    def next(self) -> Outgoing:
        """The next instance's Outgoing (waiting for it if it is not ready yet); the ones
        after it are started meanwhile. Raises IndexError past the last one."""
        self._top_up()
        if not self._pending:
            raise IndexError("no instance left to prepare")
        future = self._pending.popleft()
        self._top_up()
        return future.result()

    def drop(self) -> None:
        """Cancel what was not started (a C-CANCEL, an association gone); what runs
        finishes in its thread and is dropped."""
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        self._upcoming = iter(())
