"""C-MOVE against the real node: dcmtk's movescu and pynetdicom as requesters, dcmtk's
storescp (declared in [[peers]]) and a pynetdicom Storage SCP as destinations.

The archive (retrieve_data) holds JPEG Baseline, Explicit and Implicit VR Little Endian
instances of two patients; `exact` writes what it receives bit for bit (`+B`), so an
instance sent as stored must arrive with the stored dataset's very bytes.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from analysis_support import wait_for
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelMove,
)
from retrieve_data import (
    BIG_STUDY_SIZE,
    Item,
    assert_converted_pixels,
    build_archive,
    dataset_bytes,
    retrieve_keys,
    run_scu,
    send_as_stored,
)
from sqlalchemy import create_engine, select
from tls_support import Pki, make_pki

from node.testing.dcmtk import DCMTK_ENV, StoreSCP, dcmtk
from node.testing.index import index_connection, stored_path
from node.testing.node_process import NodeProcess, start_node, storescu, wait_for_log
from node.testing.ports import ServerDidNotStart, server_port, start_on_server_port
from storage.deliveries import enqueue
from storage.models import Delivery, DeliveryState


@dataclass
class Setup:
    node: NodeProcess
    items: list[Item]
    exact: StoreSCP
    implicit: StoreSCP
    strict_port: int
    strict_received: list[str]
    strict_refuses: set[str]

    def select(self, patient: str, study: int | None = None, series: int | None = None):
        """Items of a patient, study (1-based within the patient) and series."""
        chosen = [i for i in self.items if i.patient_id == patient]
        if study is not None:
            studies = list(dict.fromkeys(i.study for i in chosen))
            chosen = [i for i in chosen if i.study == studies[study - 1]]
        if series is not None:
            series_uids = list(dict.fromkeys(i.series for i in chosen))
            chosen = [i for i in chosen if i.series == series_uids[series - 1]]
        return chosen


def _strict_destination(port: int, received: list[str], refuses: set[str]):
    """A Storage SCP that takes Secondary Captures in JPEG Baseline only, and refuses the
    instances in `refuses` with 0xA700."""
    ae = AE(ae_title="STRICT")
    ae.add_supported_context(SecondaryCaptureImageStorage, [JPEGBaseline8Bit])

    def handle_store(event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        received.append(uid)
        return 0xA700 if uid in refuses else 0x0000

    return ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)]
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, siim_dicom_files: list[Path]) -> Iterator:
    root = tmp_path_factory.mktemp("move")
    items = build_archive(siim_dicom_files, root / "archive")
    exact = StoreSCP(root / "exact", "STORESCP", ("+xa", "+B"))
    implicit = StoreSCP(root / "implicit", "IMPLICITONLY", ("+xi",))
    strict_received: list[str] = []
    strict_refuses: set[str] = set()
    strict = _strict_destination(0, strict_received, strict_refuses)
    strict_port = int(strict.server_address[1])
    node = None
    try:
        exact.start()
        implicit.start()
        peers = [
            {"ae_title": scp.ae_title, "host": "127.0.0.1", "port": scp.port}
            for scp in (exact, implicit)
        ] + [
            {"ae_title": "STRICT", "host": "127.0.0.1", "port": strict_port},
            # Nobody listens there: a port outside the ephemeral range, handed to no one else.
            {"ae_title": "DOWN", "host": "127.0.0.1", "port": server_port()},
        ]
        node = start_node(root / "node", {"peers": peers})
        send_as_stored(node, [item.path for item in items])
        yield Setup(node, items, exact, implicit, strict_port, strict_received, strict_refuses)
    finally:
        if node is not None:
            node.stop()
        strict.shutdown()
        exact.stop()
        implicit.stop()


def _received(scp: StoreSCP) -> dict[str, Path]:
    files = [p for p in scp.folder.iterdir() if p.is_file()]
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in files}


def _empty(scp: StoreSCP) -> None:
    for path in scp.folder.iterdir():
        path.unlink()


def _move(node: NodeProcess, identifier: Dataset, destination: str, model=None) -> list:
    """pynetdicom C-MOVE: every (status, identifier) response, the final one last."""
    model = model or StudyRootQueryRetrieveInformationModelMove
    ae = AE(ae_title="PYMOVE")
    ae.add_requested_context(model)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        return list(assoc.send_c_move(identifier, destination, model))
    finally:
        assoc.release()


def _study_query(study: str) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study
    return query


CASES = [
    ("-P", "PATIENT", dict()),
    ("-P", "STUDY", dict(study=1)),
    ("-P", "SERIES", dict(study=1, series=2)),
    ("-P", "IMAGE", dict(study=1, series=1)),
    ("-S", "STUDY", dict(study=2)),
    ("-S", "SERIES", dict(study=1, series=1)),
    ("-S", "IMAGE", dict(study=1, series=2)),
]


@pytest.mark.parametrize(("root", "level", "where"), CASES)
def test_movescu_at_every_level_gets_the_stored_bytes(setup: Setup, root, level, where) -> None:
    _empty(setup.exact)
    wanted = setup.select("RETRIEVE-1", **where)
    result = run_scu(
        "movescu", setup.node, root, retrieve_keys(level, wanted, root), "-aem", "STORESCP"
    )

    assert result.returncode == 0, result.stderr
    assert "Received Final Move Response (Success)" in result.stdout + result.stderr
    received = _received(setup.exact)
    assert sorted(received) == sorted(item.sop for item in wanted)
    for item in wanted:
        stored = stored_path(setup.node, item.sop)
        assert dataset_bytes(received[item.sop]) == dataset_bytes(stored), item.syntax


def test_pending_responses_count_the_sub_operations(setup: Setup) -> None:
    _empty(setup.exact)
    study = setup.select("RETRIEVE-1", study=1)
    query = _study_query(study[0].study)
    query.PatientID = "RETRIEVE-1"

    responses = _move(setup.node, query, "STORESCP", PatientRootQueryRetrieveInformationModelMove)

    counts = [
        (
            status.Status,
            status.get("NumberOfRemainingSuboperations"),
            status.NumberOfCompletedSuboperations,
            status.NumberOfFailedSuboperations,
            status.NumberOfWarningSuboperations,
        )
        for status, _ in responses
    ]
    assert counts == [
        (0xFF00, 3, 1, 0, 0),
        (0xFF00, 2, 2, 0, 0),
        (0xFF00, 1, 3, 0, 0),
        (0xFF00, 0, 4, 0, 0),
        (0x0000, 0, 4, 0, 0),  # pynetdicom keeps "remaining 0" in the final response
    ]
    assert len(_received(setup.exact)) == 4


def test_unknown_destination_is_a801(setup: Setup) -> None:
    wanted = setup.select("RETRIEVE-1", study=2)
    responses = _move(setup.node, _study_query(wanted[0].study), "NOBODY")

    assert [status.Status for status, _ in responses] == [0xA801]
    wait_for_log(setup.node, "C-MOVE destination 'NOBODY' is not in [[peers]]")


def test_a_destination_that_does_not_answer_is_a801(setup: Setup) -> None:
    wanted = setup.select("RETRIEVE-1", study=2)
    since = len(setup.node.log_text())

    responses = _move(setup.node, _study_query(wanted[0].study), "DOWN")

    assert [status.Status for status, _ in responses] == [0xA801]
    log = wait_for_log(setup.node, "status=0xA801", since=since)
    assert "C-MOVE association to DOWN at 127.0.0.1" in log


def test_a_retrieve_without_its_unique_key_is_a900(setup: Setup) -> None:
    query = _study_query("")

    responses = _move(setup.node, query, "STORESCP")

    status, _ = responses[-1]
    assert status.Status == 0xA900
    assert "StudyInstanceUID" in status.ErrorComment


def test_cancel_stops_the_move(setup: Setup) -> None:
    _empty(setup.exact)
    study = setup.select("RETRIEVE-2")
    since = len(setup.node.log_text())
    result = run_scu(
        "movescu",
        setup.node,
        "-S",
        retrieve_keys("STUDY", study, "-S"),
        "-aem",
        "STORESCP",
        "--cancel",
        "2",
    )

    output = result.stdout + result.stderr
    assert "Received Final Move Response (Cancel" in output, output[-2000:]
    log = wait_for_log(setup.node, "status=0xFE00", since=since)
    assert f"instances={BIG_STUDY_SIZE}" in log
    assert 2 <= len(_received(setup.exact)) < BIG_STUDY_SIZE


def test_implicit_only_destination_gets_jpeg_decompressed(setup: Setup) -> None:
    _empty(setup.implicit)
    jpegs = setup.select("RETRIEVE-1", study=1, series=1)
    assert {item.syntax for item in jpegs} == {JPEGBaseline8Bit}
    since = len(setup.node.log_text())

    result = run_scu(
        "movescu",
        setup.node,
        "-S",
        retrieve_keys("SERIES", jpegs, "-S"),
        "-aem",
        "IMPLICITONLY",
    )

    assert "Received Final Move Response (Success)" in result.stdout + result.stderr
    received = _received(setup.implicit)
    assert sorted(received) == sorted(item.sop for item in jpegs)
    for item in jpegs:
        path = received[item.sop]
        dump = subprocess.run(
            [dcmtk("dcmdump"), "-q", str(path)], env=DCMTK_ENV, capture_output=True, text=True
        )
        assert dump.returncode == 0, dump.stderr
        assert "=LittleEndianImplicit" in dump.stdout
        got = dcmread(path)
        assert got.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        assert_converted_pixels(got, item.path)
    log = wait_for_log(setup.node, "converted from JPEG Baseline", since=since)
    assert "as Implicit VR Little Endian" in log


def test_partial_failure_is_b000_with_the_failed_instances(setup: Setup) -> None:
    """STRICT takes JPEG Baseline only, and refuses one of the JPEG instances: of study
    1, one JPEG arrives, one is refused by STRICT, and the two uncompressed ones fail in
    the node, since it does not compress."""
    study = setup.select("RETRIEVE-1", study=1)
    setup.strict_refuses.add(study[1].sop)
    since = len(setup.node.log_text())

    responses = _move(setup.node, _study_query(study[0].study), "STRICT")

    status, identifier = responses[-1]
    assert status.Status == 0xB000
    assert status.NumberOfCompletedSuboperations == 1
    assert status.NumberOfFailedSuboperations == 3
    failed = identifier.FailedSOPInstanceUIDList
    assert sorted(failed) == sorted([study[1].sop, study[2].sop, study[3].sop])
    assert setup.strict_received[-2:] == [study[0].sop, study[1].sop]
    log = wait_for_log(setup.node, "failed=3", since=since)
    assert log.count("STRICT takes only JPEG Baseline (Process 1)") == 2


def _tls_storescp(
    port: int, pki: Pki, folder: Path, timeout: float = 10
) -> tuple[subprocess.Popen, int]:
    """dcmtk's storescp over TLS on `port`, once it accepts connections there; with it."""
    process = subprocess.Popen(
        [dcmtk("storescp"), "+tls", str(pki.client.key), str(pki.client.certificate)]
        + ["+cf", str(pki.ca), "-aet", "TLSSCP", "+xa", "-od", str(folder), str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process, port
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                process.wait()
                raise ServerDidNotStart(f"storescp +tls did not listen on port {port}") from None
            time.sleep(0.05)


def test_a_peer_with_tls_gets_the_move_over_dicom_tls(
    tmp_path: Path, siim_dicom_files: list[Path]
) -> None:
    pki = make_pki(tmp_path / "pki")
    folder = tmp_path / "received"
    folder.mkdir()
    tls_scp, port = start_on_server_port(
        lambda port: _tls_storescp(port, pki, folder), "storescp +tls"
    )
    node = None
    try:
        tls = {"certificate": str(pki.node.certificate), "private_key": str(pki.node.key)}
        node = start_node(
            tmp_path / "node",
            {
                "tls": {**tls, "ca_bundle": str(pki.ca)},
                "peers": [{"ae_title": "TLSSCP", "host": "127.0.0.1", "port": port, "tls": True}],
            },
        )
        source = siim_dicom_files[0]
        assert storescu(node, [source]).returncode == 0
        header = dcmread(source, stop_before_pixels=True)

        result = run_scu(
            "movescu",
            node,
            "-S",
            ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={header.StudyInstanceUID}"],
            "-aem",
            "TLSSCP",
        )

        assert "Received Final Move Response (Success)" in result.stdout + result.stderr
        received = [dcmread(p).SOPInstanceUID for p in folder.iterdir()]
        assert received == [header.SOPInstanceUID]
        assert f"association to TLSSCP at 127.0.0.1:{port} with DICOM TLS" in node.log_text()
    finally:
        if node is not None:
            node.stop()
        tls_scp.terminate()
        tls_scp.wait(timeout=10)


def _enqueue(node: NodeProcess, sops: list[str], destination: str) -> None:
    engine = create_engine(node.db_url)
    try:
        with engine.begin() as conn:
            enqueue(conn, sops, destination)
    finally:
        engine.dispose()


def _delivery(node: NodeProcess, sop: str):
    with index_connection(node.db_url) as conn:
        return conn.execute(
            select(Delivery.state, Delivery.attempts, Delivery.last_error).where(
                Delivery.sop_instance_uid == sop
            )
        ).one()


def test_the_result_sender_fails_at_once_what_cannot_go(setup: Setup) -> None:
    """The result sender shares the path: an instance that the destination takes neither
    as stored nor converted is failed after one attempt, not retried for ever; here with
    a JPEG instance that STRICT takes in the same association."""
    explicit = next(item for item in setup.items if item.syntax == ExplicitVRLittleEndian)
    jpeg = setup.select("RETRIEVE-2")[-1]
    _enqueue(setup.node, [explicit.sop, jpeg.sop], "STRICT")

    wait_for(
        lambda: _delivery(setup.node, explicit.sop).state == DeliveryState.FAILED,
        15,
        "the delivery to fail",
    )
    delivery = _delivery(setup.node, explicit.sop)
    assert delivery.attempts == 1
    assert delivery.last_error == (
        "STRICT takes only JPEG Baseline (Process 1); Explicit VR Little Endian does not convert"
    )
    assert explicit.sop not in setup.strict_received
    wait_for(lambda: jpeg.sop in setup.strict_received, 5, "the JPEG instance to arrive")


def test_the_result_sender_fails_at_once_a_destination_that_takes_nothing(
    setup: Setup,
) -> None:
    implicit = next(item for item in setup.items if item.syntax == ImplicitVRLittleEndian)
    _enqueue(setup.node, [implicit.sop], "STRICT")

    wait_for(
        lambda: _delivery(setup.node, implicit.sop).state == DeliveryState.FAILED,
        15,
        "the delivery to fail",
    )
    delivery = _delivery(setup.node, implicit.sop)
    assert (delivery.attempts, delivery.last_error) == (
        1,
        "STRICT accepted none of the contexts proposed",
    )
