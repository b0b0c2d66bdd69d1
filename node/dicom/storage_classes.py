"""What the Storage SCP takes: its transfer syntaxes and its SOP classes.

The SOP classes are pynetdicom's storage list, the retired standard storage classes it
leaves out (still sent by old modalities and held in old archives: the retired Ultrasound
Image Storage, the SR "Trial" classes, ...), and, when `node.accept_unknown_sop_classes` is
on, any SOP class UID no dictionary knows, proposed under a storage transfer syntax (as
Orthanc's `UnknownSopClassAccepted`, or dcmtk's storescp `--promiscuous`). A UID that pydicom
or pynetdicom knows as something other than a storage class (Q/R, verification, print,
worklist, a transfer syntax, ...) never gets a storage context.

pynetdicom serves a request by the service class of its SOP class UID and aborts the
association for one it does not know, so:
- the retired classes are registered with it once (`register_uid`, its API for that);
- unknown UIDs are not registered (peers choose them: a process-wide registry would grow
  without bound and change what every other association accepts). Per association,
  `UnknownSopClasses` adds their contexts to that association's acceptor before it
  negotiates (EVT_REQUESTED), and answers them as SOP Class Common Extended Negotiation
  items of the Storage Service Class (EVT_SOP_COMMON, PS3.7 D.3.3.6), which pynetdicom uses
  to choose the service of a request; such items are never sent back to the peer.
`tests/test_storage_classes.py` pins both behaviours of pynetdicom.
"""

from __future__ import annotations

import re

from pydicom import uid
from pydicom._uid_dict import UID_dictionary
from pynetdicom import AllStoragePresentationContexts, build_context, evt, register_uid
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import SOPClassCommonExtendedNegotiation
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import ServiceClass, StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

# Stored as received, so any encoding a sender uses is fine as long as the pixel data is in
# the dataset: uncompressed, deflated, every JPEG family, RLE, and the video encodings.
# Left out: the JPIP "referenced" syntaxes, whose pixel data lives on a remote server.
UNCOMPRESSED_TRANSFER_SYNTAXES: tuple[str, ...] = (
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
)
COMPRESSED_TRANSFER_SYNTAXES: tuple[str, ...] = (
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.JPEG2000MCLossless,
    uid.JPEG2000MC,
    uid.HTJ2KLossless,
    uid.HTJ2KLosslessRPCL,
    uid.HTJ2K,
    uid.RLELossless,
    uid.MPEG2MPML,
    uid.MPEG2MPMLF,
    uid.MPEG2MPHL,
    uid.MPEG2MPHLF,
    uid.MPEG4HP41,
    uid.MPEG4HP41F,
    uid.MPEG4HP41BD,
    uid.MPEG4HP41BDF,
    uid.MPEG4HP422D,
    uid.MPEG4HP422DF,
    uid.MPEG4HP423D,
    uid.MPEG4HP423DF,
    uid.MPEG4HP42STEREO,
    uid.MPEG4HP42STEREOF,
    uid.HEVCMP51,
    uid.HEVCM10P51,
)
STORAGE_TRANSFER_SYNTAXES: tuple[str, ...] = (
    UNCOMPRESSED_TRANSFER_SYNTAXES + COMPRESSED_TRANSFER_SYNTAXES
)

STORAGE_SERVICE_CLASS = "1.2.840.10008.4.2"  # PS3.4 B: the Storage Service Class UID
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # a DICOMDIR: media only, not an instance

# A storage SOP class's name in PS3.6 table A-1 (as pydicom's UID dictionary holds it).
_STORAGE_NAME = re.compile(r".+ Storage( - Trial| - For (Presentation|Processing))?")


def _is_storage_entry(sop_class: str) -> bool:
    name, kind = UID_dictionary[sop_class][:2]
    return (
        kind == "SOP Class"
        and sop_class != MEDIA_STORAGE_DIRECTORY
        and _STORAGE_NAME.fullmatch(name) is not None
    )


def _retired_storage_classes() -> dict[str, str]:
    """{UID: keyword} of the retired standard storage SOP classes."""
    return {
        sop_class: entry[4]
        for sop_class, entry in UID_dictionary.items()
        if entry[3] == "Retired" and _is_storage_entry(sop_class)
    }


RETIRED_STORAGE_SOP_CLASSES: dict[str, str] = _retired_storage_classes()
# Every SOP class the node stores by default: pynetdicom's list and the retired ones.
STORAGE_SOP_CLASSES: tuple[str, ...] = tuple(
    dict.fromkeys(
        [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
        + list(RETIRED_STORAGE_SOP_CLASSES)
    )
)


def register_retired_storage() -> None:
    """Make pynetdicom serve C-STORE for the retired storage classes (idempotent)."""
    for sop_class, keyword in RETIRED_STORAGE_SOP_CLASSES.items():
        if uid_to_service_class(sop_class) is not StorageServiceClass:
            register_uid(sop_class, keyword, StorageServiceClass)


_STORED_BY_DEFAULT = frozenset(STORAGE_SOP_CLASSES)


def _is_valid_uid(value: str) -> bool:
    """PS3.5 9.1 (as pydicom's UID.is_valid, without the warning its constructor gives)."""
    return len(value) <= 64 and uid.RE_VALID_UID.match(value) is not None


def is_unknown(sop_class: str) -> bool:
    """True for a well-formed UID the node has no context for and that neither pydicom's
    dictionary nor pynetdicom knows as anything but a storage class: a private SOP class,
    one newer than both, or a standard storage class pynetdicom does not serve (DICOS)."""
    if sop_class in _STORED_BY_DEFAULT or not _is_valid_uid(sop_class):
        return False
    if sop_class in UID_dictionary and not _is_storage_entry(sop_class):
        return False
    return uid_to_service_class(sop_class) is ServiceClass


def storage_context(sop_class: str) -> PresentationContext:
    """A supported context for `sop_class`: every storage syntax, both roles (a C-GET
    requester proposes to be the Storage SCP on its own association)."""
    context = build_context(sop_class, list(STORAGE_TRANSFER_SYNTAXES))
    context.scu_role = True
    context.scp_role = True
    return context


class UnknownSopClasses:
    """Storage contexts, for one association at a time, for the unknown SOP class UIDs its
    requestor proposes under at least one storage transfer syntax."""

    def __init__(self) -> None:
        self._syntaxes = frozenset(STORAGE_TRANSFER_SYNTAXES)

    def handlers(self) -> list[tuple]:
        """The pynetdicom handler bindings that give them their contexts and service."""
        return [(evt.EVT_REQUESTED, self.add_contexts), (evt.EVT_SOP_COMMON, self.as_storage)]

    def proposed(self, assoc: Association) -> list[str]:
        """The unknown SOP class UIDs in the association request, in proposal order."""
        found: dict[str, None] = {}
        for context in assoc.requestor.primitive.presentation_context_definition_list:
            sop_class = str(context.abstract_syntax)
            if sop_class in found:
                continue
            if self._syntaxes.isdisjoint(str(s) for s in context.transfer_syntax):
                continue
            if is_unknown(sop_class):
                found[sop_class] = None
        return list(found)

    def add_contexts(self, event: evt.Event) -> None:
        """EVT_REQUESTED, before negotiation: this acceptor alone gets the contexts (the
        AE's own list, shared by every association, is left as it is)."""
        unknown = self.proposed(event.assoc)
        if unknown:
            acceptor = event.assoc.acceptor
            acceptor.supported_contexts = [
                *acceptor.supported_contexts,
                *(storage_context(sop_class) for sop_class in unknown),
            ]

    def as_storage(self, event: evt.Event) -> dict[str, SOPClassCommonExtendedNegotiation]:
        """EVT_SOP_COMMON, during negotiation: the unknown classes belong to the Storage
        Service Class, so their C-STORE requests reach the node's C-STORE handler. The
        requestor's own items are not taken: none of them may reroute a known class."""
        items = {}
        for sop_class in self.proposed(event.assoc):
            item = SOPClassCommonExtendedNegotiation()
            item.sop_class_uid = sop_class
            item.service_class_uid = STORAGE_SERVICE_CLASS
            items[sop_class] = item
        return items
