"""Results from whatever source the node analyses.

Every greyscale image of pydicom's test files that pydicom decodes, relabelled CR or DX,
gives a Secondary Capture and a Structured Report in which dciodvfy finds no error; odd
source values (a single-valued DS, a missing Type 2 attribute, an empty sequence, a value
invalid for its VR) are copied by VR and multiplicity or left out; and a result that cannot
be built fails its job once, with its reason in `pneumonode status`.
"""

from __future__ import annotations

import io
import logging
import shutil
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_files
from pydicom.uid import generate_uid
from sqlalchemy import func, select
from support import siim_files

from ai.data.preprocess import UnsupportedImageError, check_single_frame_grey, read_grey8
from ai.results.attributes import DEIDENTIFICATION_UNSTATED
from ai.results.sc.picture import render_picture
from ai.results.sc.sop import build_heatmap_sc
from ai.results.sr.sop import build_finding_sr
from node.testing.config_files import write_config
from node.testing.samples import small_image

pytestmark = pytest.mark.filterwarnings(
    "ignore:The string .* person name:UserWarning",
    "ignore:Invalid value for VR:UserWarning",
)

MODEL = "pneumonode pneumothorax tiny (0.1.0+test)"
DEVICE_UID = "1.2.826.0.1.3680043.8.498.1"


def _greyscale_test_images() -> list[Path]:
    """pydicom's test files holding one greyscale frame that pydicom decodes."""
    chosen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in sorted(get_testdata_files("*.dcm")):
            try:
                ds = pydicom.dcmread(name)
                check_single_frame_grey(ds, name)
                read_grey8(ds)
            except (UnsupportedImageError, Exception):
                continue
            chosen.append(Path(name))
    return chosen


GREYSCALE = _greyscale_test_images()


def relabelled(path: Path, modality: str) -> pydicom.Dataset:
    """The file as a PACS would send it to the node: a chest CR/DX with its own UIDs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
    ds.Modality = modality
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def heatmap() -> np.ndarray:
    yy, xx = np.mgrid[0:14, 0:14]
    return np.exp(-((yy - 5.0) ** 2 + (xx - 9.0) ** 2) / 8.0)


def build_both(source: pydicom.Dataset, transfer_syntax: str = "uncompressed"):
    picture = render_picture(read_grey8(source), heatmap(), 0.7, "Pneumothorax", threshold=0.5,
                             model=MODEL)
    sc = build_heatmap_sc(
        source,
        picture.rgb,
        pixel_scale=picture.scale,
        transfer_syntax=transfer_syntax,
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        series_number=9001,
        instance_number=1,
        manufacturer="pneumonode",
        model_name="pneumonode tiny",
        software_version="0.1.0",
    )
    sr = build_finding_sr(
        source,
        probability=0.7,
        present=True,
        threshold=0.5,
        algorithm_name="pneumonode tiny",
        algorithm_version="0.1.0",
        device_observer_name="PNEUMONODE",
        device_observer_uid=DEVICE_UID,
        device_observer_manufacturer="pneumonode",
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        series_number=9002,
        instance_number=1,
    )
    return sc, sr


def dciodvfy_errors(dataset: pydicom.Dataset, path: Path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    pydicom.dcmwrite(path, dataset, enforce_file_format=True)
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]


def library_modality(sr: pydicom.Dataset) -> str:
    def items(dataset):
        for item in dataset.get("ContentSequence", []):
            yield item
            yield from items(item)

    (entry,) = [
        item
        for item in items(sr)
        if item.ValueType == "CODE" and item.ConceptNameCodeSequence[0].CodeValue == "121139"
    ]
    return entry.ConceptCodeSequence[0].CodeValue


def test_the_corpus_holds_the_images_the_issue_names() -> None:
    names = {path.name for path in GREYSCALE}
    assert len(GREYSCALE) >= 20
    assert {"JPEG2000.dcm", "CT_small.dcm", "693_J2KI.dcm", "rtdose_1frame.dcm"} <= names


@pytest.mark.parametrize("path", GREYSCALE, ids=lambda path: path.name)
def test_sc_and_sr_from_every_greyscale_test_image_are_valid(path: Path, tmp_path: Path) -> None:
    index = GREYSCALE.index(path)
    source = relabelled(path, "CR" if index % 2 else "DX")
    sc, sr = build_both(source, "jpeg-baseline" if index % 3 == 0 else "uncompressed")
    assert not dciodvfy_errors(sc, tmp_path / "sc.dcm")
    assert not dciodvfy_errors(sr, tmp_path / "sr.dcm")
    assert library_modality(sr) == source.Modality  # the source's own, not OT
    assert (sc.StudyInstanceUID, sr.StudyInstanceUID) == (source.StudyInstanceUID,) * 2


def test_odd_source_values_are_copied_by_vr_and_multiplicity(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = small_image(rows=128, columns=96)  # no AccessionNumber, StudyID, ... (Type 2)
    source.LossyImageCompression = "01"
    source.LossyImageCompressionMethod = "ISO_15444_1"  # one value each
    source.LossyImageCompressionRatio = "338.687338501292"
    source.OtherPatientIDsSequence = []  # an empty sequence
    source.PatientOrientation = ["L", "PF"]  # valid DICOM, refused by highdicom's enum
    source.PatientIdentityRemoved = "YES"  # without the method Type 1C asks for
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source.PatientSex = "Male"  # not M, F or O
        source.StudyDate = "2004-01-19"  # not a DA
        source.PatientAge = "23"  # not an AS
    del source.BodyPartExamined
    with caplog.at_level(logging.DEBUG, logger="ai.results.attributes"):
        sc, sr = build_both(source, "jpeg-baseline")

    for name, built in (("sc", sc), ("sr", sr)):
        assert not dciodvfy_errors(built, tmp_path / f"{name}.dcm"), name
        result = pydicom.dcmread(tmp_path / f"{name}.dcm")
        assert result.AccessionNumber == "" and result.StudyID == ""  # missing Type 2: empty
        assert result.PatientSex == "" and result.StudyDate == ""  # invalid Type 2: empty
        assert "PatientAge" not in result  # invalid Type 3: left out
        assert result.PatientID == source.PatientID
        assert result.PatientIdentityRemoved == "YES"
        assert result.DeidentificationMethod == DEIDENTIFICATION_UNSTATED
        assert "OtherPatientIDsSequence" not in result  # empty Type 3: says nothing
    assert sc.PatientOrientation == ["L", "PF"]
    assert sc.Laterality == ""  # no body part: the side is unknown, not invented
    assert list(sc.LossyImageCompressionMethod) == ["ISO_15444_1", "ISO_10918_1"]
    assert [float(v) for v in sc.LossyImageCompressionRatio][0] == pytest.approx(338.687338501)
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "ai.results.attributes")
    for keyword in ("PatientSex", "StudyDate", "PatientAge"):
        assert keyword in logged
    assert "Male" not in logged and "2004-01-19" not in logged  # names, never values


# --- the worker: a result that cannot be built fails its job once ------------------------


def _store(archive, dataset: pydicom.Dataset) -> str:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    archive.store_file_bytes(buffer.getvalue(), calling_ae="STORESCU")
    return str(dataset.SOPInstanceUID)


def test_worker_analyses_odd_sources_and_fails_an_unbuildable_result_once(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from node.config import load_config
    from node.context import build_context
    from node.process.worker import AnalysisWorker
    from storage.models import AnalysisJob, Instance, JobResult, JobState
    from storage.report import format_report, queue_report

    config_path = write_config(
        tmp_path / "config.toml",
        {
            "storage": {"folder": str(tmp_path / "storage")},
            "analysis": {
                "enabled": True,
                "model": str(tiny_model),
                "device": "cpu",
                "batch_size": 4,
                "max_wait_seconds": 0.1,
            },
            "peers": [],
        },
    )
    context = build_context(load_config(config_path))
    by_name = {path.name: path for path in GREYSCALE}
    sources = [relabelled(by_name["JPEG2000.dcm"], "DX"), relabelled(by_name["CT_small.dcm"], "CR")]
    sources[0].BodyPartExamined = "CHEST"  # WHOLE BODY is not analysed
    sources += [relabelled(by_name[n], "DX") for n in ("693_J2KI.dcm", "rtdose_1frame.dcm")]
    good = [_store(context.archive, ds) for ds in sources]
    doomed = _store(context.archive, pydicom.dcmread(siim_files()[0]))

    import ai.results.sc.sop as heatmap_sc

    real_build = heatmap_sc.build_heatmap_sc

    def build_or_fail(source, rgb, **arguments):
        if source.SOPInstanceUID == doomed:
            raise TypeError("'DSfloat' object is not iterable")
        return real_build(source, rgb, **arguments)

    monkeypatch.setattr(heatmap_sc, "build_heatmap_sc", build_or_fail)
    worker = AnalysisWorker(context, inline_results=True)  # the patch is in this process
    worker.start()
    try:
        deadline = time.monotonic() + 120
        while worker.jobs.queued_count() or _claimed(context.engine):
            assert time.monotonic() < deadline, "analysis did not finish"
            time.sleep(0.2)
        time.sleep(1.0)  # time enough for a loop to claim the failed job again
    finally:
        worker.stop()

    with context.engine.connect() as conn:
        jobs = {
            uid: (state, reason, attempts)
            for uid, state, reason, attempts in conn.execute(
                select(
                    AnalysisJob.sop_instance_uid,
                    AnalysisJob.state,
                    AnalysisJob.reason,
                    AnalysisJob.attempts,
                )
            )
        }
        results = conn.scalar(
            select(func.count()).select_from(Instance).where(Instance.is_result.is_(True))
        )
    state, reason, attempts = jobs[doomed]
    assert state == JobState.FAILED and attempts == 1
    assert reason.startswith(  # the kind that failed, first; the others were stored
        "sc: cannot build the heatmap Secondary Capture: "
        "TypeError: 'DSfloat' object is not iterable"
    )
    for uid in good:
        assert jobs[uid][0] == JobState.DONE, jobs[uid]
        assert "is not in [[peers]]" in jobs[uid][1]
    # A kind fails alone: the failed image's SR was stored, its SC not.
    assert results == 2 * len(good) + 1
    with context.engine.connect() as conn:
        kinds = dict(conn.execute(
            select(JobResult.kind, JobResult.state)
            .join(AnalysisJob, AnalysisJob.id == JobResult.job_pk)
            .where(AnalysisJob.sop_instance_uid == doomed)
        ).all())
    assert kinds == {"sr": "stored", "seg": "not_made", "sc": "failed"}

    status = format_report(queue_report(context.engine))
    assert f"analysis jobs: done {len(good)}, failed 1" in status
    assert f"results kept on the node, not sent: {2 * len(good)}" in status
    assert "caller 'STORESCU' is not in [[peers]]" in status
    assert f"{doomed}: sc: cannot build the heatmap Secondary Capture" in status
    assert f"result objects: SC failed 1, stored {len(good)}; SEG " in status
    assert f"; SR stored {len(good) + 1}" in status
    context.engine.dispose()


def _claimed(engine) -> int:
    from storage.models import AnalysisJob, JobState

    with engine.connect() as conn:
        return conn.scalar(
            select(func.count())
            .select_from(AnalysisJob)
            .where(AnalysisJob.state == JobState.CLAIMED)
        )
