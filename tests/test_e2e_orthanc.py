"""End to end with a real PACS: Orthanc sends chest X-rays to the node, the node analyses
them and sends a heatmap Secondary Capture and a Structured Report back into the study.

Runs on the CPU with a tiny deterministic model (ai.train.tiny_artifact.build_tiny_artifact): the
numbers are meaningless, but the path is the product's, end to end.
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pydicom
import pytest
from analysis_support import analysed, analysing_alone, predict_with_cli, wait_for
from pydicom.uid import SecondaryCaptureImageStorage
from support import PROBABILITY_TOLERANCE

from ai.results.sr.sop import read_finding
from node.testing.dcmtk import DCMTK_ENV, dcmtk
from node.testing.node_process import start_node
from node.testing.orthanc import start_orthanc

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


def _sources(siim_path: Path) -> list[Path]:
    positives = sorted((siim_path / "train" / "Pneumothorax").glob("*.dcm"))[:2]
    negatives = sorted((siim_path / "train" / "No Pneumothorax").glob("*.dcm"))[:2]
    return positives + negatives


def test_orthanc_receives_sc_and_sr_in_the_same_study(
    tmp_path: Path, siim_path: Path, tiny_model: Path
) -> None:
    orthanc = start_orthanc(tmp_path / "orthanc")
    node = None
    try:
        node = start_node(
            tmp_path / "node",
            {
                **analysing_alone(tiny_model),
                "peers": [{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}],
            },
        )
        orthanc.set_modality("pneumonode", ("PNEUMONODE", "127.0.0.1", node.port))
        files = _sources(siim_path)
        uploaded = [orthanc.upload(f) for f in files]
        orthanc.post_json(
            "/modalities/pneumonode/store",
            {"Resources": [u["ID"] for u in uploaded], "Synchronous": True},
        )

        wait_for(analysed(node, len(files)), 180, "the node to analyse the images")

        def study_instances(study_id: str) -> list[dict]:
            return orthanc.get_json(f"/studies/{study_id}/instances")

        wait_for(
            lambda: all(len(study_instances(u["ParentStudy"])) >= 3 for u in uploaded),
            120,
            "the SC and the SR to arrive in Orthanc",
        )
        expected = predict_with_cli(tiny_model, files, tmp_path / "predict.csv")
        for source_file, upload in zip(files, uploaded, strict=True):
            source = pydicom.dcmread(source_file, stop_before_pixels=True)
            instances = study_instances(upload["ParentStudy"])
            assert len(instances) == 3, "exactly one SC and one SR per image"
            stored = [
                pydicom.dcmread(io.BytesIO(orthanc.request("GET", f"/instances/{i['ID']}/file")))
                for i in instances
            ]
            results = [ds for ds in stored if ds.SOPInstanceUID != source.SOPInstanceUID]
            assert len(results) == 2
            sc = next(ds for ds in results if "PixelData" in ds)
            sr = next(ds for ds in results if str(ds.SOPClassUID) == COMPREHENSIVE_SR)

            for result in (sc, sr):
                assert result.StudyInstanceUID == source.StudyInstanceUID
                assert result.PatientID == source.PatientID
                assert result.SeriesInstanceUID != source.SeriesInstanceUID
            assert str(sc.SOPClassUID) == SecondaryCaptureImageStorage
            assert sc.PhotometricInterpretation == "RGB"
            assert sc.BurnedInAnnotation == "YES"
            assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
            # The X-ray whole at the bottom, under the caption band added above it.
            rows, columns, samples = sc.pixel_array.shape
            assert (columns, samples) == (source.Columns, 3) and rows > source.Rows

            finding = read_finding(sr)
            assert finding.referenced_sop_instance_uid == source.SOPInstanceUID
            # The SR's DS value holds 16 characters of the worker's probability; `predict`
            # ran the same model in another process, on other batches with other thread
            # counts, so the two agree to float32 precision, not to the bit.
            assert finding.probability == pytest.approx(
                expected[source.SOPInstanceUID], abs=PROBABILITY_TOLERANCE
            )
            assert finding.present == (finding.probability >= finding.threshold)
            assert finding.algorithm_name and finding.algorithm_version
            concept_codes = _codes(sr)
            assert ("36118008", "SCT") in concept_codes, "finding Pneumothorax (SCT 36118008)"

        # The node indexes its own results and answers C-FIND for them.
        study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        answers = tmp_path / "findscu"
        answers.mkdir()
        found = subprocess.run(
            [
                dcmtk("findscu"),
                "-S",
                "-X",
                "-od",
                str(answers),
                "-aec",
                "PNEUMONODE",
                "127.0.0.1",
                str(node.port),
                "-k",
                "QueryRetrieveLevel=SERIES",
                "-k",
                f"StudyInstanceUID={study_uid}",
                "-k",
                "SeriesInstanceUID=",
                "-k",
                "Modality=",
                "-k",
                "SeriesDescription=",
            ],
            env=DCMTK_ENV,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert found.returncode == 0, found.stderr
        modalities = sorted(str(pydicom.dcmread(path).Modality) for path in answers.iterdir())
        assert modalities == ["CR", "OT", "SR"], "the source, its SC and its SR series"
    finally:
        if node is not None:
            node.stop()
        orthanc.stop()


def _codes(ds: pydicom.Dataset) -> set[tuple[str, str]]:
    """Every (CodeValue, CodingSchemeDesignator) anywhere in the SR content tree."""
    found: set[tuple[str, str]] = set()

    def walk(item: pydicom.Dataset) -> None:
        for element in item:
            if element.VR == "SQ":
                for child in element.value:
                    if "CodeValue" in child:
                        found.add((str(child.CodeValue), str(child.CodingSchemeDesignator)))
                    walk(child)

    walk(ds)
    return found
