"""The pynetdicom release whose internals the node adapts, checked before it serves.

`guarded_transport`, `reactor_wakeups`, `find_stream`, `stored_send`, `store_response` and
`store_stream` reach into pynetdicom's private code (how it reads a PDU, builds acceptor
sockets, naps in its reactors, pauses around a send, copies its contexts, sends a C-STORE
from a file, makes a response message, hands a received P-DATA-TF PDU to DIMSE). A
different release may change any of these and the node would
start and misbehave, so `serve` and `worker` refuse to start unless the installed pynetdicom
is the one pinned in pyproject.toml and constraints.txt and still holds each piece of code
relied on. `tests/test_guarded_transport.py` pins the same pieces with behaviour tests.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import pynetdicom
from pynetdicom import _validators, events, fsm
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dul import DULServiceProvider
from pynetdicom.service_class import QueryRetrieveServiceClass, StorageServiceClass
from pynetdicom.transport import RequestHandler

REQUIRED_PYNETDICOM = "3.0.4"


class UnsupportedPynetdicom(RuntimeError):
    """The installed pynetdicom is not the release the node's adaptations were written for."""


@dataclass(frozen=True)
class ReliedOn:
    """A piece of pynetdicom's code that one of the node's adaptations depends on."""

    where: Callable
    code: str
    why: str


RELIED_ON: tuple[ReliedOn, ...] = (
    ReliedOn(DULServiceProvider._read_pdu_data, "self.socket.recv(6)",
             "guarded_transport bounds the PDU header read"),
    ReliedOn(DULServiceProvider._read_pdu_data, "self.socket.recv(pdu_length)",
             "guarded_transport bounds the PDU body read"),
    ReliedOn(RequestHandler._create_association,
             "AssociationSocket(assoc, client_socket=self.request)",
             "guarded_transport wraps each acceptor socket"),
    ReliedOn(RequestHandler._create_association, "deepcopy(self.server.contexts)",
             "the shared presentation contexts are not copied per association"),
    ReliedOn(DULServiceProvider.run_reactor, "time.sleep(self._run_loop_delay)",
             "reactor_wakeups replaces the DUL reactor's nap"),
    ReliedOn(Association._run_reactor, "self.dimse.get_msg(block=False)",
             "reactor_wakeups keeps a paused reactor off the sender's responses"),
    ReliedOn(Association._run_reactor, "self._reactor_checkpoint.wait()",
             "reactor_wakeups knows where the reactor pauses"),
    ReliedOn(Association.send_c_store, "self._reactor_checkpoint.clear()",
             "a send pauses the reactor before it reads its response"),
    ReliedOn(DIMSEServiceProvider.receive_primitive, "self.msg_queue.put(",
             "reactor_wakeups wakes the association reactor on a queued message"),
    ReliedOn(Association._run_reactor, "self._serve_request(msg,",
             "peer_silence restarts the idle timer once a request is served"),
    ReliedOn(Association._run_reactor, "self.dul.idle_timer_expired()",
             "peer_silence: the reactor checks the idle timer between requests"),
    ReliedOn(DULServiceProvider.idle_timer_expired, "self._idle_timer.expired",
             "peer_silence restarts or turns off the DUL's idle timer"),
    ReliedOn(Association.send_c_store, "req._dataset_path = (fpath, offset)",
             "stored_send: a path is sent from the file's bytes, not decoded"),
    ReliedOn(Association.send_c_store, "self._get_valid_context(",
             "stored_send frames a C-STORE in the context send_c_store would choose"),
    ReliedOn(Association.send_c_store, "status = self._check_received_status(rsp)",
             "stored_send reads the C-STORE response as send_c_store does"),
    ReliedOn(Association.send_c_store, "self._handle_no_response()",
             "stored_send treats a missing C-STORE response as send_c_store does"),
    ReliedOn(Association._run_reactor, "self._is_paused = True",
             "stored_send waits for the paused reactor as send_c_store does"),
    ReliedOn(QueryRetrieveServiceClass._get_scp, "self.assoc.send_c_store(dataset, msg_id",
             "stored_send: C-GET sub-operations go through the association's send_c_store"),
    ReliedOn(QueryRetrieveServiceClass._move_scp, "store_assoc.send_c_store(",
             "stored_send: C-MOVE sub-operations go through the association's send_c_store"),
    ReliedOn(DULServiceProvider._send, "self.socket.send(pdu.encode())",
             "stored_send.serialise_writes: the DUL writes each PDU in one socket send"),
    ReliedOn(DULServiceProvider._process_recv_primitive, "self.to_provider_queue.queue[0]",
             "reactor_wakeups wakes the DUL on a queued primitive"),
    ReliedOn(DIMSEServiceProvider.send_msg, "dimse_msg = _RSP_TO_MESSAGE[primitive.__class__]()",
             "store_response: C-STORE responses are made by the class this map names"),
    ReliedOn(DIMSEServiceProvider.send_msg, "dimse_msg.encode_msg(context_id",
             "store_response: the message encodes itself into P-DATA primitives"),
    ReliedOn(DIMSEMessage.__init__, "self._data_set_file: \"NTF | None\" = None",
             "store_response.C_STORE_RSP sets the attributes DIMSEMessage.__init__ sets"),
    ReliedOn(DULServiceProvider._read_pdu_data, "pdu, event = self._decode_pdu(bytestream)",
             "store_stream claims a P-DATA-TF PDU where pynetdicom decodes it"),
    ReliedOn(fsm.DT_2, 'dul.assoc.dimse.receive_primitive(cast("P_DATA", pdu.to_primitive()))',
             "store_stream gets its claimed PDU back from the DT-2 action"),
    ReliedOn(DULServiceProvider.run_reactor, "self._idle_timer.restart()",
             "store_stream: the DUL restarts the idle timer as each PDU arrives"),
    ReliedOn(Association._serve_request, "self.acceptor.accepted_common_extended[class_uid][0]",
             "store_stream picks the service class of a request as pynetdicom does"),
    ReliedOn(Association._serve_request, "uid_to_service_class(class_uid)(self)",
             "store_stream picks the service class of a request as pynetdicom does"),
    ReliedOn(StorageServiceClass.SCP, "rsp = self.validate_status(",
             "store_stream answers a refusal as the Storage SCP does"),
    ReliedOn(events.trigger, 'setattr(assoc, "abort", assoc._abort_nonblocking)',
             "store_stream: a handler in the DUL thread gets the abort that does not wait"),
    ReliedOn(_validators.validate_ui, "if not len(value) < 65:",
             "uid_validity.validate_ui answers as pynetdicom's UI validator"),
)


def problems(version: str | None = None) -> list[str]:
    """What differs from the pynetdicom the node was written for (empty when all is well)."""
    found = pynetdicom.__version__ if version is None else version
    if found != REQUIRED_PYNETDICOM:
        return [f"pynetdicom {found} is installed"]
    missing = []
    for piece in RELIED_ON:
        try:
            source = inspect.getsource(piece.where)
        except (OSError, TypeError):
            source = ""
        if piece.code not in source:
            missing.append(f"{piece.where.__qualname__} no longer has {piece.code!r} ({piece.why})")
    return missing


def check_pynetdicom(version: str | None = None) -> None:
    """Raise UnsupportedPynetdicom, naming the release needed, unless the internals match."""
    found = problems(version)
    if found:
        raise UnsupportedPynetdicom(
            f"pneumonode needs pynetdicom {REQUIRED_PYNETDICOM} (it adapts that release's "
            f"internals), but {'; '.join(found)}: install it with `pip install -c "
            f"constraints.txt -e .` or `pip install pynetdicom=={REQUIRED_PYNETDICOM}`"
        )
