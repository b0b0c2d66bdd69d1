"""The DICOM application entity: what the node accepts, and the node in one process.

`DicomNode` builds the pynetdicom AE from the configuration (AE title, limits, timeouts,
the presentation contexts of Verification, Storage and Query/Retrieve FIND, MOVE and GET;
the storage classes are node.dicom.storage_classes', unknown ones added per association
when `node.accept_unknown_sop_classes` is on), binds the service handlers to a shared
`NodeContext` and runs the server with any background services (the analysis worker, the
result sender) beside it. `serve` (node.process.serve_processes) runs one, or several
serve processes of one.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from pynetdicom import AE, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (
    Verification,
)

from node.config import Config
from node.context import NodeContext, build_context
from node.dicom.admission import Admission
from node.dicom.find_scp import FIND_SOP_CLASSES, handle_find, handle_sop_extended
from node.dicom.get_scp import handle_get
from node.dicom.guarded_transport import GuardedRequestHandler, GuardedServer, GuardLimits
from node.dicom.move_scp import handle_move
from node.dicom.retrieve import GET_SOP_CLASSES, MOVE_SOP_CLASSES
from node.dicom.slots import AssociationSlots
from node.dicom.storage_classes import (
    STORAGE_SOP_CLASSES,
    STORAGE_TRANSFER_SYNTAXES,
    UNCOMPRESSED_TRANSFER_SYNTAXES,
    UnknownSopClasses,
    is_unknown,
    register_retired_storage,
)
from node.dicom.storage_scp import handle_store
from node.dicom.store_response import install as install_store_responses
from node.dicom.tls import server_context
from node.dicom.uid_validity import install as remember_uid_validity
from node.metrics.definitions import metrics
from node.metrics.dimse import DimseMetrics
from node.process.logs import quiet_pynetdicom
from storage.consistency import RecoveryReport, log_recovery, recover

log = logging.getLogger(__name__)

# How long a stopping node lets open associations finish before aborting them.
SHUTDOWN_GRACE_SECONDS = 10.0


class BackgroundService(Protocol):
    """Something that runs beside the DICOM server for the life of `serve`."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


# Builds a background service once the node's context exists (e.g. the analysis worker).
ServiceFactory = Callable[[NodeContext], BackgroundService]


class BackgroundServices:
    """The services `serve` runs beside its listeners: started once the context exists,
    stopped in reverse order, one failing to stop not keeping the others running."""

    def __init__(self, factories: Sequence[ServiceFactory]) -> None:
        self._factories = tuple(factories)
        self._running: list[BackgroundService] = []

    def start(self, context: NodeContext) -> None:
        for factory in self._factories:
            service = factory(context)
            service.start()
            self._running.append(service)

    def stop(self) -> None:
        for service in reversed(self._running):
            try:
                service.stop()
            except Exception:
                log.exception("error while stopping %s", type(service).__name__)
        self._running.clear()


def node_slots(config: Config, processes: int) -> AssociationSlots:
    """The node-wide association counts for `processes` serve processes."""
    node = config.node
    return AssociationSlots(
        node.max_associations,
        node.max_associations_per_address,
        processes,
        unknown=node.max_unknown_associations,
    )


def build_ae(config: Config) -> AE:
    """The AE with its limits and every presentation context the node accepts."""
    ae = AE(ae_title=config.node.ae_title)
    # node.dicom.slots counts associations and waiting connections for the whole node;
    # pynetdicom's own count includes connections that have not yet asked, so it is only
    # a backstop here.
    node = config.node
    ae.maximum_associations = 4 * node.max_associations + node.max_unknown_associations
    ae.maximum_pdu_size = config.node.max_pdu
    ae.network_timeout = config.node.network_timeout
    # As acceptor, the ACSE timeout is the ARTIM timer: a connection that sends nothing.
    ae.acse_timeout = config.node.association_request_timeout
    ae.dimse_timeout = config.node.network_timeout
    # Calling AE titles are checked by node.dicom.admission, before pynetdicom negotiates.
    ae.require_called_aet = config.node.require_called_ae_title
    install_store_responses()  # every C-STORE-RSP it sends, encoded in one go
    remember_uid_validity()  # pydicom's UID check, answered once per UID
    ae.add_supported_context(Verification, UNCOMPRESSED_TRANSFER_SYNTAXES)
    # Both roles: a C-GET requester proposes to be the Storage SCP on its own association
    # (SCP/SCU role selection); a sender proposes nothing and keeps the default roles.
    # pynetdicom's storage classes and the retired ones (node.dicom.storage_classes).
    register_retired_storage()
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, STORAGE_TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
    for sop_class in FIND_SOP_CLASSES + MOVE_SOP_CLASSES + GET_SOP_CLASSES:
        ae.add_supported_context(sop_class, UNCOMPRESSED_TRANSFER_SYNTAXES)
    return ae


def _peer_of(event: evt.Event) -> str:
    requestor = event.assoc.requestor
    return f"calling AE {requestor.ae_title!r} from {requestor.address}:{requestor.port}"


# A-ASSOCIATE-RJ (result source, diagnostic) -> why, PS3.8 9.3.4 (pynetdicom's rejections;
# node.dicom.guarded_transport logs those it answers itself).
_REJECTION_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised",
    (2, 1): "user identity not accepted",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded (node.max_associations)",
}
_REJECTION_LABELS = {
    (1, 2): "application_context",
    (1, 3): "calling_ae_title",
    (1, 7): "called_ae_title",
    (2, 2): "protocol_version",
    (3, 1): "congestion",
    (3, 2): "max_associations",
}
# A-ASSOCIATE-AC presentation context results (PS3.8 9.3.3.2).
_CONTEXT_RESULTS = {
    1: "user rejection",
    2: "no reason",
    3: "SOP class not supported",
    4: "transfer syntaxes not supported",
}
MAX_LOGGED_CONTEXTS = 4  # refused contexts named in an accepted association's line


class AssociationLog:
    """One log line per association: who called, and why it was rejected or which
    presentation contexts were refused. UIDs and AE titles only, never patient data."""

    def __init__(self, config: Config) -> None:
        self.ae_title = config.node.ae_title
        self.unknown_accepted = config.node.accept_unknown_sop_classes

    def handlers(self) -> list[tuple]:
        return [
            (evt.EVT_ACCEPTED, self.accepted),
            (evt.EVT_REJECTED, self.rejected),
            (evt.EVT_RELEASED, self.released),
            (evt.EVT_ABORTED, self.aborted),
        ]

    def accepted(self, event: evt.Event) -> None:
        log.info("association accepted: %s%s", _peer_of(event), self._refused(event))

    def rejected(self, event: evt.Event) -> None:
        metrics().associations_rejected.labels(self.reason_label(event)).inc()
        log.info("association rejected: %s, %s", self.reason(event), _peer_of(event))

    def released(self, event: evt.Event) -> None:
        log.info("association released: %s", _peer_of(event))

    def aborted(self, event: evt.Event) -> None:
        log.info("association aborted: %s", _peer_of(event))

    @staticmethod
    def reason_label(event: evt.Event) -> str:
        """The rejection as a short metric label (no AE title: titles are the log's)."""
        answer = event.assoc.acceptor.primitive
        return _REJECTION_LABELS.get((answer.result_source, answer.diagnostic), "other")

    def reason(self, event: evt.Event) -> str:
        """Why pynetdicom answered the request with the A-ASSOCIATE-RJ it sent."""
        answer = event.assoc.acceptor.primitive
        source, diagnostic = answer.result_source, answer.diagnostic
        if (source, diagnostic) == (1, 7):
            called = str(event.assoc.requestor.primitive.called_ae_title).strip()
            return (
                f"called AE title {called!r} not recognised (this node is {self.ae_title!r};"
                " node.require_called_ae_title)"
            )
        known = _REJECTION_REASONS.get((source, diagnostic))
        return known or f"result {answer.result}, source {source}, diagnostic {diagnostic}"

    def _refused(self, event: evt.Event) -> str:
        """'; refused contexts: <SOP class UID> (<why>), ...' or '' when none was."""
        refused = event.assoc.rejected_contexts
        if not refused:
            return ""
        named = list(
            dict.fromkeys(
                f"{context.abstract_syntax} ({self._context_result(context)})"
                for context in refused
            )
        )
        shown = named[:MAX_LOGGED_CONTEXTS]
        more = f" and {len(named) - len(shown)} more" if len(named) > len(shown) else ""
        return f"; refused contexts: {', '.join(shown)}{more}"

    def _context_result(self, context: PresentationContext) -> str:
        result = context.result
        text = _CONTEXT_RESULTS.get(result or 0, f"result {result}")
        if result == 3 and not self.unknown_accepted and is_unknown(str(context.abstract_syntax)):
            text += "; node.accept_unknown_sop_classes is off"
        return text


def _handle_echo(event: evt.Event) -> int:
    return 0x0000


def event_handlers(context: NodeContext) -> list[tuple]:
    """The pynetdicom handler bindings of the node's services."""
    handlers = [
        (evt.EVT_C_ECHO, _handle_echo),
        (evt.EVT_C_STORE, handle_store, [context]),
        (evt.EVT_C_FIND, handle_find, [context]),
        (evt.EVT_C_MOVE, handle_move, [context]),
        (evt.EVT_C_GET, handle_get, [context]),
        (evt.EVT_SOP_EXTENDED, handle_sop_extended, [context]),
        *AssociationLog(context.config).handlers(),
        *DimseMetrics().handlers(),
    ]
    if context.config.node.accept_unknown_sop_classes:
        handlers += UnknownSopClasses().handlers()
    return handlers


class DicomNode:
    """The running node: context, DICOM server and background services, started together."""

    def __init__(
        self,
        config: Config,
        services: Sequence[ServiceFactory] = (),
        context: NodeContext | None = None,
        *,
        slots: AssociationSlots | None = None,
        listening_sockets: Mapping[int, socket.socket] | None = None,
        recover_at_start: bool = True,
    ) -> None:
        """`slots` and `listening_sockets` come from a supervising `serve` when several
        processes serve one port (node.process.serve_processes); that process has then
        run the recovery pass, so `recover_at_start` is False."""
        quiet_pynetdicom()
        self.config = config
        self._slots = slots or node_slots(config, processes=1)
        self._listening_sockets = dict(listening_sockets or {})
        self._recover_at_start = recover_at_start
        self.ae = build_ae(config)
        self.context = context or build_context(config)
        self._services = BackgroundServices(services)
        self._servers: list[GuardedServer] = []
        admission = Admission(config)
        self.limits = GuardLimits(
            read_timeout=config.node.network_timeout,
            request_timeout=config.node.association_request_timeout,
            max_pdu_length=config.node.max_pdu,
            max_per_address=config.node.max_associations_per_address,
            admission=admission,
            is_peer=admission.is_peer,
            is_peer_host=admission.is_peer_host,
        )

    @property
    def addresses(self) -> list[tuple[str, int, bool]]:
        """(host, port, is TLS) of each listener; the port is the real one if 0 was asked."""
        return [
            (
                str(server.server_address[0]),
                int(server.server_address[1]),
                server.tls_context is not None,
            )
            for server in self._servers
        ]

    def associations(self) -> int:
        """Associations this node holds now."""
        return self._slots.held()

    def not_serving(self) -> str | None:
        """None while the listeners accept (started, not yet stopping); else why not."""
        return None if self._servers else "the DICOM listener is not running"

    def _listen(self, port: int, tls_context: ssl.SSLContext | None) -> None:
        server = self.ae.make_server(
            (self.config.node.bind_address, port),
            evt_handlers=event_handlers(self.context),
            server_class=GuardedServer,
            request_handler=GuardedRequestHandler,
            limits=self.limits,
            slots=self._slots,
            tls_context=tls_context,
            listening_socket=self._listening_sockets.get(port),
        )
        self._servers.append(server)
        threading.Thread(target=server.serve_forever, name=f"listener-{port}", daemon=True).start()
        host, real_port = server.server_address[:2]
        log.info(
            "listening as %s on %s:%d%s (storage %s)",
            self.config.node.ae_title,
            host,
            real_port,
            " with DICOM TLS" if tls_context is not None else "",
            self.config.storage.folder,
        )

    def start(self) -> None:
        if self._recover_at_start:
            log_recovery(recover_storage(self.context))
        for port, is_tls in listener_ports(self.config):
            self._listen(port, server_context(self.config.tls) if is_tls else None)
        self._slots.set_accepting(True)
        self._services.start(self.context)

    def stop(self, grace_seconds: float = SHUTDOWN_GRACE_SECONDS) -> None:
        """Stop accepting, let open associations finish (then abort them), stop services."""
        if self._servers:
            self._slots.set_accepting(False)
            for server in self._servers:
                server.shutdown()
            self._finish_associations(grace_seconds)
            self._servers.clear()
        self._services.stop()
        self.context.engine.dispose()
        log.info("stopped")

    def _finish_associations(self, grace_seconds: float) -> None:
        deadline = time.monotonic() + grace_seconds
        while self.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in self.ae.active_associations:
            log.warning("aborting association with %r at shutdown", assoc.requestor.ae_title)
            assoc.abort()
        for assoc in self.ae.active_associations:
            assoc.join(timeout=5)


def recover_storage(context: NodeContext) -> RecoveryReport:
    """The start-up recovery pass over the context's storage folder and index."""
    archive = context.archive
    return recover(
        archive.files, archive.engine, quarantine=context.config.storage.quarantine_orphans
    )


def listener_ports(config: Config) -> list[tuple[int, bool]]:
    """(port, is TLS) of each listener the configuration asks for."""
    tls = config.tls
    ports: list[tuple[int, bool]] = []
    if not tls.enabled or tls.plain_listener:
        ports.append((config.node.port, False))
    if tls.enabled:
        ports.append((tls.port, True))
    return ports
