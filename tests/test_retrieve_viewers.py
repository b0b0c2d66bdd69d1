"""Retrieve as viewers and PACS do it, from a node that analysed one SIIM image with a tiny
model (ai.train.tiny_artifact) and holds the image, its heatmap Secondary Capture (stored in JPEG
Baseline here) and its Structured Report:

- the result sender delivers both to a destination that accepts Implicit VR Little Endian
  only (dcmtk storescp +xi): the SC goes converted, and nothing is retried forever;
- Orthanc queries the node and retrieves the study with C-MOVE into itself;
- a viewer's flow: findscu for the patient's studies, getscu of the study, dcmj2pnm renders
  the heatmap that came back.
"""

from __future__ import annotations

import io
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from analysis_support import analysed, analysing_alone, delivered, wait_for
from PIL import Image
from pydicom import dcmread
from pydicom.uid import ImplicitVRLittleEndian, JPEGBaseline8Bit
from sqlalchemy import select

from node.testing.dcmtk import DCMTK_ENV, StoreSCP, dcmtk
from node.testing.index import delivery_counts, index_connection, result_uids_of
from node.testing.node_process import NodeProcess, start_node, storescu
from node.testing.orthanc import OrthancProcess, start_orthanc
from storage.models import DeliveryState, Instance


@dataclass
class Analysed:
    node: NodeProcess
    orthanc: OrthancProcess
    implicit: StoreSCP
    source: Path
    patient_id: str
    study: str
    image: str
    sc: str
    sr: str


@pytest.fixture(scope="module")
def analysed_node(
    tmp_path_factory: pytest.TempPathFactory, siim_path: Path, tiny_model: Path
) -> Iterator[Analysed]:
    root = tmp_path_factory.mktemp("viewers")
    source = sorted((siim_path / "train" / "Pneumothorax").glob("*.dcm"))[0]
    header = dcmread(source, stop_before_pixels=True)
    implicit = StoreSCP(root / "implicit", "IMPLICITONLY", ("+xi",))
    orthanc = start_orthanc(root / "orthanc")
    node = None
    try:
        implicit.start()
        node = start_node(
            root / "node",
            {
                **analysing_alone(tiny_model, sc_transfer_syntax="jpeg-baseline"),
                "delivery": {
                    "destination": implicit.ae_title,
                    "retry_initial_seconds": 0.3,
                    "retry_max_seconds": 1.0,
                },
                "peers": [
                    {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port},
                    {"ae_title": implicit.ae_title, "host": "127.0.0.1", "port": implicit.port},
                ],
            },
        )
        orthanc.set_modality("pneumonode", ("PNEUMONODE", "127.0.0.1", node.port))
        assert storescu(node, [source]).returncode == 0
        wait_for(analysed(node, 1), 180, "the node to analyse the image")
        results = result_uids_of(node, str(header.SOPInstanceUID))
        yield Analysed(
            node,
            orthanc,
            implicit,
            source,
            str(header.PatientID),
            str(header.StudyInstanceUID),
            str(header.SOPInstanceUID),
            results["sc"],
            results["sr"],
        )
    finally:
        if node is not None:
            node.stop()
        orthanc.stop()
        implicit.stop()


def test_results_reach_a_destination_that_refuses_jpeg(analysed_node: Analysed) -> None:
    node = analysed_node.node
    with index_connection(node.db_url) as conn:
        sc_syntax = conn.scalar(
            select(Instance.transfer_syntax_uid).where(
                Instance.sop_instance_uid == analysed_node.sc
            )
        )
    assert sc_syntax == JPEGBaseline8Bit

    wait_for(delivered(node, 2), 60, "the SC and SR to be delivered")

    assert delivery_counts(node) == {DeliveryState.DELIVERED.value: 2}
    received = {str(dcmread(p).SOPInstanceUID): p for p in analysed_node.implicit.folder.iterdir()}
    assert sorted(received) == sorted([analysed_node.sc, analysed_node.sr])
    for path in received.values():
        assert dcmread(path).file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        dump = subprocess.run([dcmtk("dcmdump"), "-q", str(path)], capture_output=True)
        assert dump.returncode == 0
    assert "converted from JPEG Baseline" in node.log_text()


def test_orthanc_queries_the_node_and_moves_the_study_into_itself(
    analysed_node: Analysed,
) -> None:
    orthanc = analysed_node.orthanc
    query = orthanc.post_json(
        "/modalities/pneumonode/query",
        {"Level": "Study", "Query": {"PatientID": analysed_node.patient_id}},
    )
    answers = orthanc.get_json(f"/queries/{query['ID']}/answers?expand")
    assert [a["0020,000d"]["Value"] for a in answers] == [analysed_node.study]

    orthanc.post_json(
        f"/queries/{query['ID']}/retrieve", {"TargetAet": "ORTHANC", "Synchronous": True}
    )

    studies = orthanc.get_json("/studies?expand")
    assert [s["MainDicomTags"]["StudyInstanceUID"] for s in studies] == [analysed_node.study]
    instances = orthanc.get_json(f"/studies/{studies[0]['ID']}/instances")
    got = {
        str(
            dcmread(io.BytesIO(orthanc.request("GET", f"/instances/{i['ID']}/file"))).SOPInstanceUID
        )
        for i in instances
    }
    assert got == {analysed_node.image, analysed_node.sc, analysed_node.sr}


def test_a_viewer_finds_gets_and_renders_the_heatmap(
    analysed_node: Analysed, tmp_path: Path
) -> None:
    node = analysed_node.node
    found = tmp_path / "found"
    found.mkdir()
    common = ["-aet", "VIEWER", "-aec", node.ae_title]
    result = subprocess.run(
        [dcmtk("findscu"), "-S", *common, "-X", "-od", str(found)]
        + ["-k", "QueryRetrieveLevel=STUDY", "-k", f"PatientID={analysed_node.patient_id}"]
        + ["-k", "StudyInstanceUID", "-k", "ModalitiesInStudy", node.host, str(node.port)],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    studies = [str(dcmread(p).StudyInstanceUID) for p in found.iterdir()]
    assert studies == [analysed_node.study]

    got = tmp_path / "got"
    got.mkdir()
    result = subprocess.run(
        [dcmtk("getscu"), "-S", *common, "-od", str(got)]
        + ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={studies[0]}"]
        + [node.host, str(node.port)],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    files = {str(dcmread(p).SOPInstanceUID): p for p in got.iterdir()}
    assert set(files) == {analysed_node.image, analysed_node.sc, analysed_node.sr}

    picture = tmp_path / "heatmap.png"
    rendered = subprocess.run(
        [dcmtk("dcmj2pnm"), "+on", str(files[analysed_node.sc]), str(picture)],
        capture_output=True,
        text=True,
    )
    assert rendered.returncode == 0, rendered.stderr
    sc = dcmread(files[analysed_node.sc])
    with Image.open(picture) as image:
        assert image.mode == "RGB"
        assert image.size == (sc.Columns, sc.Rows)
