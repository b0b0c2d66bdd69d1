"""DICOM TLS: dcmtk's echoscu, storescu and findscu over `+tls` to the node's TLS listener,
mutual TLS, the plain listener switched off, and Orthanc's DICOM TLS both ways (Orthanc
sends to the node, the node's result sender delivers to Orthanc), certificates made here."""

from __future__ import annotations

import ssl
import subprocess
import time
from pathlib import Path

import pytest
from dicom_data import file_bytes
from pynetdicom import AE
from sqlalchemy import create_engine
from tls_support import Pki, make_pki

from node.testing.dcmtk import DCMTK_ENV, dcmtk
from node.testing.index import count_instances
from node.testing.node_process import NodeProcess, start_node, wait_for_log
from node.testing.orthanc import start_orthanc
from node.testing.ports import server_port
from node.testing.samples import small_image
from storage.deliveries import enqueue


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_section(pki: Pki, **extra) -> dict:
    """TLS on, with the node's certificate; start_node binds its TLS port (node.tls_port)."""
    return {
        "enabled": True,
        "certificate": str(pki.node.certificate),
        "private_key": str(pki.node.key),
        "ca_bundle": str(pki.ca),
        **extra,
    }


def dcmtk_tls(
    program: str,
    node: NodeProcess,
    port: int,
    pki: Pki,
    *options: str,
    files: tuple[Path, ...] = (),
    identity: str = "client",
) -> subprocess.CompletedProcess:
    """A dcmtk program over TLS, with the client's, a stranger's or no certificate."""
    party = {"client": pki.client, "stranger": pki.stranger}.get(identity)
    credentials = ["+tla"] if party is None else ["+tls", str(party.key), str(party.certificate)]
    return subprocess.run(
        [
            dcmtk(program),
            *credentials,
            "+cf",
            str(pki.ca),
            "-aec",
            node.ae_title,
            *options,
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_dcmtk_echo_store_and_find_over_tls(tmp_path: Path, pki: Pki) -> None:
    node = start_node(tmp_path / "node", {"tls": tls_section(pki)})
    port = node.tls_port
    assert port is not None
    try:
        assert dcmtk_tls("echoscu", node, port, pki).returncode == 0
        image = tmp_path / "image.dcm"
        ds = small_image(patient_id="TLS-PATIENT")
        image.write_bytes(file_bytes(ds))
        stored = dcmtk_tls("storescu", node, port, pki, files=(image,))
        assert stored.returncode == 0, stored.stderr
        assert count_instances(node.db_url) == 1
        found = dcmtk_tls(
            "findscu",
            node,
            port,
            pki,
            "-S",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "PatientID=TLS-PATIENT",
            "-k",
            "StudyInstanceUID",
        )
        assert found.returncode == 0, found.stderr
        assert ds.StudyInstanceUID in found.stderr + found.stdout
        # The plain listener still serves (plain_listener defaults to true).
        plain = subprocess.run(
            [dcmtk("echoscu"), "-aec", node.ae_title, node.host, str(node.port)],
            env=DCMTK_ENV,
            capture_output=True,
        )
        assert plain.returncode == 0
        assert "with DICOM TLS" in node.log_text()
    finally:
        assert node.stop() == 0


def test_mutual_tls_requires_a_certificate_from_the_trusted_ca(tmp_path: Path, pki: Pki) -> None:
    # A port with no listener, so that the check below that nothing answers there means
    # something: the node must not open it.
    plain_port = server_port()
    node = start_node(
        tmp_path / "node",
        {
            "node": {"port": plain_port},
            "tls": tls_section(pki, verify_clients=True, plain_listener=False),
        },
    )
    port = node.tls_port
    assert port is not None and node.port == plain_port
    try:
        assert dcmtk_tls("echoscu", node, port, pki).returncode == 0
        assert dcmtk_tls("echoscu", node, port, pki, identity="anonymous").returncode != 0
        assert dcmtk_tls("echoscu", node, port, pki, identity="stranger").returncode != 0
        log = node.log_text()
        assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in log
        assert "CERTIFICATE_VERIFY_FAILED" in log
        assert "Traceback" not in log
        # No plain listener: the configured plain port is closed.
        plain = subprocess.run(
            [dcmtk("echoscu"), "-to", "2", "-aec", node.ae_title, node.host, str(node.port)],
            env=DCMTK_ENV,
            capture_output=True,
        )
        assert plain.returncode != 0
    finally:
        assert node.stop() == 0


def test_orthanc_dicom_tls_both_ways(tmp_path: Path, pki: Pki) -> None:
    orthanc = start_orthanc(
        tmp_path / "orthanc",
        extra={
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(pki.client.certificate),
            "DicomTlsPrivateKey": str(pki.client.key),
            "DicomTlsTrustedCertificates": str(pki.ca),
            "DicomTlsRemoteCertificateRequired": True,
        },
    )
    node = start_node(
        tmp_path / "node",
        {
            "tls": tls_section(pki, verify_clients=True),
            "peers": [
                {
                    "ae_title": "ORTHANC",
                    "host": "127.0.0.1",
                    "port": orthanc.dicom_port,
                    "tls": True,
                }
            ],
        },
    )
    try:
        orthanc.set_modality(
            "pneumonode",
            {"AET": "PNEUMONODE", "Host": "127.0.0.1", "Port": node.tls_port, "UseDicomTls": True},
        )
        # Orthanc -> node, over TLS.
        ds = small_image()
        source = tmp_path / "source.dcm"
        source.write_bytes(file_bytes(ds))
        orthanc_id = orthanc.upload(source)["ID"]
        orthanc.post_json("/modalities/pneumonode/store", [orthanc_id])
        assert count_instances(node.db_url) == 1
        assert "calling AE 'ORTHANC'" in node.log_text()
        # node -> Orthanc, over TLS: a delivery of the stored instance, as for a result.
        orthanc.request("DELETE", f"/instances/{orthanc_id}")
        engine = create_engine(node.db_url)
        try:
            with engine.begin() as conn:
                enqueue(conn, [ds.SOPInstanceUID], "ORTHANC")
        finally:
            engine.dispose()
        deadline = time.monotonic() + 30
        while not orthanc.post_json(
            "/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": ds.SOPInstanceUID}}
        ):
            assert time.monotonic() < deadline, node.log_text()[-2000:]
            time.sleep(0.2)
        # The node logs the delivery once Orthanc's response is in, a moment after Orthanc
        # has stored the instance.
        wait_for_log(node, f"delivered SOP {ds.SOPInstanceUID} to ORTHANC", timeout=30)
    finally:
        assert node.stop() == 0
        orthanc.stop()


def test_associations_over_tls_count_against_the_slots(tmp_path: Path, pki: Pki) -> None:
    """The handshake replaces the connection's socket: its slot must still be found."""
    node = start_node(
        tmp_path / "slots",
        {
            "tls": tls_section(pki),
            "node": {"max_associations": 2, "max_associations_per_address": 2},
            "peers": [],
        },
    )
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.check_hostname = False
    ae = AE(ae_title="TLSCALLER")
    ae.add_requested_context("1.2.840.10008.1.1")
    held = []
    try:
        for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
            held.append(
                ae.associate(
                    "127.0.0.1",
                    node.tls_port,
                    ae_title=node.ae_title,
                    tls_args=(context, None),
                    bind_address=(source, 0),
                )
            )
        assert [a.is_established for a in held] == [True, True, False]
        assert held[2].is_rejected
        wait_for_log(node, "association rejected: the node holds node.max_associations")
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.release()
        assert node.stop() == 0
