"""End to end with a real PACS: Orthanc sends chest X-rays to the node, the node analyses
them and sends its results back into the study: a Structured Report, a Segmentation when
the finding is present with a region, and a heatmap Secondary Capture.

Runs on the CPU with a tiny deterministic model (ai.train.tiny_artifact.build_tiny_artifact): the
numbers are meaningless, but the path is the product's, end to end.
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from analysis_support import analysed, analysing_alone, predict_with_cli, wait_for
from pydicom.uid import SecondaryCaptureImageStorage, SegmentationStorage
from support import PROBABILITY_TOLERANCE

from ai.results.seg.sop import read_pneumothorax_seg
from ai.results.sr.sop import read_finding
from ai.train.tiny_artifact import build_always_positive_artifact
from node.testing.dcmtk import DCMTK_ENV, StoreSCP, dcmtk
from node.testing.index import result_uids_of
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


def _instances_in_orthanc(orthanc, study_id: str) -> list[pydicom.Dataset]:
    return [
        pydicom.dcmread(io.BytesIO(orthanc.request("GET", f"/instances/{i['ID']}/file")))
        for i in orthanc.get_json(f"/studies/{study_id}/instances")
    ]


def test_a_present_finding_reaches_orthanc_as_sr_seg_and_sc_and_is_retrieved_from_the_node(
    tmp_path: Path, siim_path: Path
) -> None:
    """A model whose mask head marks the whole image (`build_always_positive_artifact`):
    Orthanc gets the SR with the region's outline, the SEG with the mask and the SC, all in
    the source's study; C-GET and C-MOVE from the node bring the SEG back."""
    model = build_always_positive_artifact(tmp_path / "model")
    orthanc = start_orthanc(tmp_path / "orthanc")
    mover = StoreSCP(tmp_path / "moved", ae_title="MOVEDEST")
    mover.start()
    node = None
    try:
        node = start_node(
            tmp_path / "node",
            {
                **analysing_alone(model),
                "peers": [
                    {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port},
                    {"ae_title": "MOVEDEST", "host": "127.0.0.1", "port": mover.port},
                ],
            },
        )
        orthanc.set_modality("pneumonode", ("PNEUMONODE", "127.0.0.1", node.port))
        source_file = _sources(siim_path)[0]
        source = pydicom.dcmread(source_file, stop_before_pixels=True)
        upload = orthanc.upload(source_file)
        orthanc.post_json(
            "/modalities/pneumonode/store", {"Resources": [upload["ID"]], "Synchronous": True}
        )
        wait_for(analysed(node, 1), 180, "the node to analyse the image")
        wait_for(
            lambda: len(orthanc.get_json(f"/studies/{upload['ParentStudy']}/instances")) >= 4,
            120,
            "the SR, the SEG and the SC to arrive in Orthanc",
        )
        by_class = {
            str(ds.SOPClassUID): ds
            for ds in _instances_in_orthanc(orthanc, upload["ParentStudy"])
            if ds.SOPInstanceUID != source.SOPInstanceUID
        }
        expected = {COMPREHENSIVE_SR, SegmentationStorage, SecondaryCaptureImageStorage}
        assert set(by_class) == expected
        sr, seg = by_class[COMPREHENSIVE_SR], by_class[SegmentationStorage]
        for result in by_class.values():
            assert result.StudyInstanceUID == source.StudyInstanceUID

        segment = read_pneumothorax_seg(seg)
        assert segment.mask.shape == (source.Rows, source.Columns) and segment.mask.all()
        finding = read_finding(sr)
        assert finding.present and finding.tracking_uid == segment.tracking_uid
        assert finding.segmentation_uid == seg.SOPInstanceUID
        (outline,) = finding.regions
        border = {(0.0, 0.0), (source.Columns, 0.0), (source.Columns, source.Rows),
                  (0.0, source.Rows)}
        assert {tuple(map(float, point)) for point in outline} == border
        assert np.array_equal(outline[0], outline[-1])

        # The node keeps what it sent: C-GET of the study brings all four back ...
        got = tmp_path / "got"
        got.mkdir()
        common = ["-aet", "VIEWER", "-aec", node.ae_title]
        study_keys = ["-k", "QueryRetrieveLevel=STUDY", "-k",
                      f"StudyInstanceUID={source.StudyInstanceUID}"]
        result = subprocess.run(
            [dcmtk("getscu"), "-S", *common, "-od", str(got), *study_keys, node.host,
             str(node.port)],
            env=DCMTK_ENV, capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, result.stderr
        got_uids = {str(pydicom.dcmread(p).SOPInstanceUID) for p in got.iterdir()}
        made = result_uids_of(node, str(source.SOPInstanceUID))
        assert set(made) == {"sr", "seg", "sc"}
        assert got_uids == {str(source.SOPInstanceUID), *made.values()}
        # ... and C-MOVE of the SEG's series sends it to a third AE.
        series_keys = ["-k", "QueryRetrieveLevel=SERIES", "-k",
                       f"StudyInstanceUID={source.StudyInstanceUID}", "-k",
                       f"SeriesInstanceUID={seg.SeriesInstanceUID}"]
        result = subprocess.run(
            [dcmtk("movescu"), "-S", *common, "-aem", "MOVEDEST", *series_keys, node.host,
             str(node.port)],
            env=DCMTK_ENV, capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert mover.received_uids() == {str(seg.SOPInstanceUID): 1}
    finally:
        if node is not None:
            node.stop()
        orthanc.stop()
        mover.stop()


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
