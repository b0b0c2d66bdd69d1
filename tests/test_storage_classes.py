"""Every storage SOP class: the retired standard ones by default, any unknown one (a private
class) with `node.accept_unknown_sop_classes = true`, stored, indexed, found and retrieved
like any other; and the pynetdicom behaviours node.dicom.storage_classes relies on.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from dicom_data import file_bytes
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import (
    ModalityWorklistInformationFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)
from retrieve_data import run_scu
from sqlalchemy import select

from node.config import load_config
from node.dicom.guarded_transport import SharedContexts
from node.dicom.storage_classes import (
    RETIRED_STORAGE_SOP_CLASSES,
    STORAGE_SOP_CLASSES,
    UnknownSopClasses,
    is_unknown,
)
from node.process.server import build_ae
from node.testing.dcmtk import StoreSCP
from node.testing.index import index_connection, stored_path
from node.testing.node_process import NodeProcess, storescu, wait_for_log
from node.testing.samples import small_image
from storage.models import Instance

PRIVATE = "1.2.826.0.1.3680043.9.9999.1"  # a made-up private SOP class
RETIRED_US = "1.2.840.10008.5.1.4.1.1.6"  # Ultrasound Image Storage (Retired)
JPIP_REFERENCED = "1.2.840.10008.1.2.4.94"  # not a storage transfer syntax of the node


def test_the_retired_storage_classes_come_from_pydicoms_dictionary() -> None:
    pynetdicoms = {str(cx.abstract_syntax) for cx in AllStoragePresentationContexts}
    assert RETIRED_US in RETIRED_STORAGE_SOP_CLASSES
    assert "1.2.840.10008.5.1.4.1.1.3" in RETIRED_STORAGE_SOP_CLASSES  # US Multi-frame
    assert "1.2.840.10008.5.1.4.1.1.88.1" in RETIRED_STORAGE_SOP_CLASSES  # Text SR - Trial
    assert "1.2.840.10008.5.1.1.27" not in RETIRED_STORAGE_SOP_CLASSES  # Stored Print: print
    assert not pynetdicoms & set(RETIRED_STORAGE_SOP_CLASSES)
    assert set(STORAGE_SOP_CLASSES) == pynetdicoms | set(RETIRED_STORAGE_SOP_CLASSES)


def test_only_uids_nothing_knows_as_another_service_are_unknown() -> None:
    assert is_unknown(PRIVATE)
    assert is_unknown("1.2.840.10008.5.1.4.1.1.501.1")  # DICOS CT: storage pynetdicom lacks
    for known in (
        Verification,
        StudyRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelGet,
        ModalityWorklistInformationFind,
        "1.2.840.10008.1.20.1",  # Storage Commitment Push Model
        "1.2.840.10008.1.3.10",  # Media Storage Directory (a DICOMDIR)
        "1.2.840.10008.5.1.4.38.1",  # Hanging Protocol Storage: no patient, not archived here
        "1.2.840.10008.1.2.4.50",  # a transfer syntax
        "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage: has its context already
        RETIRED_US,  # likewise
        "1.2.3.abc",  # not a UID
    ):
        assert not is_unknown(known), known


@pytest.fixture
def acceptor() -> Iterator[tuple[int, list[tuple[str, str]]]]:
    """The node's AE (default config) serving C-STORE with unknown classes accepted, its
    contexts shared by every association as node.dicom.guarded_transport shares them."""
    ae = build_ae(load_config(None))
    received: list[tuple[str, str]] = []

    def on_store(event: evt.Event) -> int:
        received.append((str(event.context.abstract_syntax), str(event.dataset.SOPClassUID)))
        return 0x0000

    handlers = [(evt.EVT_C_STORE, on_store), *UnknownSopClasses().handlers()]
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
    server.contexts = SharedContexts(server.contexts)
    try:
        yield server.server_address[1], received
    finally:
        server.shutdown()
        assert len(server.contexts) == len(ae.supported_contexts)  # no association's extras


def _propose(port: int, contexts: list[tuple[str, list[str]]]):
    ae = AE(ae_title="PINNING")
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, syntaxes)
    assoc = ae.associate("127.0.0.1", port, ae_title=load_config(None).node.ae_title)
    assert assoc.is_established
    return assoc


def test_pynetdicom_takes_an_acceptors_own_contexts_and_common_extended_service(
    acceptor,
) -> None:
    """EVT_REQUESTED may replace the acceptor's supported contexts before negotiation, and
    the Storage Service Class answered in EVT_SOP_COMMON routes C-STORE to EVT_C_STORE."""
    port, received = acceptor
    assoc = _propose(
        port,
        [
            (PRIVATE, [ExplicitVRLittleEndian]),
            ("1.2.826.0.1.3680043.9.9999.2", [JPIP_REFERENCED]),  # no storage syntax
            (ModalityWorklistInformationFind, [ExplicitVRLittleEndian]),  # known, not storage
        ],
    )
    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        assert accepted == {PRIVATE}
        assert assoc.send_c_store(small_image(sop_class=PRIVATE)).Status == 0x0000
    finally:
        assoc.release()
    assert received == [(PRIVATE, PRIVATE)]
    # The next association proposes nothing unknown and gets none of the first one's extras.
    assoc = _propose(port, [(RETIRED_US, [ExplicitVRLittleEndian])])
    try:
        assert [str(cx.abstract_syntax) for cx in assoc.accepted_contexts] == [RETIRED_US]
        assert assoc.send_c_store(small_image(sop_class=RETIRED_US)).Status == 0x0000
    finally:
        assoc.release()
    assert received[-1] == (RETIRED_US, RETIRED_US)


# --- against the node ----------------------------------------------------------------------


def _write(folder: Path, ds: Dataset) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    path.write_bytes(file_bytes(ds))
    return path


def _store(node: NodeProcess, ds: Dataset) -> int:
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(str(ds.SOPClassUID), [ExplicitVRLittleEndian])
    ae.add_requested_context(Verification)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        if not any(cx.abstract_syntax == ds.SOPClassUID for cx in assoc.accepted_contexts):
            return -1  # no context for the class
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def _indexed_class(node: NodeProcess, sop_instance_uid: str) -> str | None:
    with index_connection(node.db_url) as conn:
        return conn.scalar(
            select(Instance.sop_class_uid).where(Instance.sop_instance_uid == sop_instance_uid)
        )


def _image_keys(ds: Dataset) -> list[str]:
    return [
        "QueryRetrieveLevel=IMAGE",
        f"StudyInstanceUID={ds.StudyInstanceUID}",
        f"SeriesInstanceUID={ds.SeriesInstanceUID}",
        f"SOPInstanceUID={ds.SOPInstanceUID}",
    ]


def test_a_private_sop_class_is_refused_by_default_with_the_reason(node_factory) -> None:
    node = node_factory(name="default")
    ds = small_image(sop_class=PRIVATE)
    assert _store(node, ds) == -1
    wait_for_log(
        node,
        f"refused contexts: {PRIVATE} (SOP class not supported; "
        "node.accept_unknown_sop_classes is off)",
    )
    assert _indexed_class(node, str(ds.SOPInstanceUID)) is None
    # A known service the node does not offer is refused without that hint.
    ae = AE(ae_title="WORKLIST")
    ae.add_requested_context(ModalityWorklistInformationFind)
    ae.add_requested_context(Verification)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    assoc.release()
    worklist = str(ModalityWorklistInformationFind)
    wait_for_log(node, f"refused contexts: {worklist} (SOP class not supported)")


def test_a_private_sop_class_is_stored_found_moved_and_got_when_accepted(
    node_factory, tmp_path: Path
) -> None:
    storescp = StoreSCP(tmp_path / "received", "STORESCP", ("+xa", "-pm"))  # -pm: any class
    storescp.start()
    try:
        node = node_factory(
            {
                "node": {"accept_unknown_sop_classes": True},
                "peers": [{"ae_title": "STORESCP", "host": "127.0.0.1", "port": storescp.port}],
            },
            name="unknown",
        )
        ds = small_image(sop_class=PRIVATE)
        assert _store(node, ds) == 0x0000
        assert _indexed_class(node, str(ds.SOPInstanceUID)) == PRIVATE
        assert dcmread(stored_path(node, str(ds.SOPInstanceUID))).SOPClassUID == PRIVATE

        # C-FIND finds it, with its class.
        ae = AE(ae_title="FINDER")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID = ds.StudyInstanceUID
        query.SeriesInstanceUID = ds.SeriesInstanceUID
        query.SOPInstanceUID = ""
        query.SOPClassUID = ""
        found = [
            identifier
            for status, identifier in assoc.send_c_find(
                query, StudyRootQueryRetrieveInformationModelFind
            )
            if status and status.Status == 0xFF00
        ]
        assoc.release()
        assert [(f.SOPInstanceUID, f.SOPClassUID) for f in found] == [
            (ds.SOPInstanceUID, PRIVATE)
        ]

        # C-MOVE to dcmtk's storescp.
        result = run_scu("movescu", node, "-S", _image_keys(ds), "-aem", "STORESCP")
        assert result.returncode == 0, result.stderr
        assert storescp.received_uids() == {str(ds.SOPInstanceUID): 1}

        # C-GET on the requester's association, which takes the SCP role for the class.
        got: list[str] = []

        def on_store(event: evt.Event) -> int:
            got.append(str(event.dataset.SOPClassUID))
            return 0x0000

        ae = AE(ae_title="GETTER")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_requested_context(PRIVATE, [ExplicitVRLittleEndian])
        assoc = ae.associate(
            node.host,
            node.port,
            ae_title=node.ae_title,
            ext_neg=[build_role(PRIVATE, scp_role=True)],
            evt_handlers=[(evt.EVT_C_STORE, on_store)],
        )
        query.QueryRetrieveLevel = "IMAGE"
        query.SOPInstanceUID = ds.SOPInstanceUID
        del query.SOPClassUID
        statuses = [
            status.Status
            for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)
        ]
        assoc.release()
        assert statuses[-1] == 0x0000 and got == [PRIVATE]
    finally:
        storescp.stop()


def test_a_retired_storage_class_is_stored_and_moved_by_default(
    node_factory, tmp_path: Path
) -> None:
    storescp = StoreSCP(tmp_path / "received", "STORESCP")
    storescp.start()
    try:
        node = node_factory(
            {"peers": [{"ae_title": "STORESCP", "host": "127.0.0.1", "port": storescp.port}]},
            name="retired",
        )
        ds = small_image(sop_class=RETIRED_US)
        # dcmtk, as a modality; -R: the contexts the file needs (its default list lacks it)
        sent = storescu(node, [_write(tmp_path / "outgoing", ds)], "-R")
        assert sent.returncode == 0, sent.stderr
        assert _indexed_class(node, str(ds.SOPInstanceUID)) == RETIRED_US
        result = run_scu("movescu", node, "-S", _image_keys(ds), "-aem", "STORESCP")
        assert result.returncode == 0, result.stderr
        assert storescp.received_uids() == {str(ds.SOPInstanceUID): 1}
        assert "refused" not in node.log_text()
    finally:
        storescp.stop()

