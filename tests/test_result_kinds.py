"""The result kinds as the node's result writer makes them: the SR, the SEG and the SC of one
image, each stored and recorded in its own job_result row, each failing alone, the SR's
region outlines and the SEG's mask the same pixels under one tracking UID.

The writer runs in this process on a real index and archive; the model's output is given
(a segmentation map drawn here, since the demo model's mask head never reaches the pixel
threshold on the sample images), so every kind's path is exercised without a trained model.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ComprehensiveSRStorage, SegmentationStorage
from support import siim_file
from test_results_seg import dciodvfy_errors, dx_source

from ai.analysis.methods import METHOD_TITLES
from ai.data.preprocess import read_grey8
from ai.results.kind import (
    KindUids,
    ResultModel,
    available_kinds,
    kind_named,
    kinds_named,
)
from ai.results.regions import PIXEL_THRESHOLD, find_regions
from ai.results.seg.sop import read_pneumothorax_seg
from ai.results.sr.sop import read_finding
from node.config import ConfigError, load_config
from node.context import NodeContext, build_context
from node.nudges import DELIVERIES_NUDGE, NudgeListener, nudge_address
from node.process.result_processes import ResultTask, ResultWriter
from node.process.worker import _header_only
from node.testing.config_files import write_config
from storage.jobs import JobQueue
from storage.models import JobState
from storage.report import format_report, queue_report

pytestmark = pytest.mark.filterwarnings(
    "ignore:The string .* person name:UserWarning",
    "ignore:Invalid value for VR:UserWarning",
)

MODEL = ResultModel(
    name="pneumonode test model",
    version="1.0",
    positive_class="Pneumothorax",
    threshold=0.5,
    observer_name="PNEUMONODE",
    observer_uid="1.2.826.0.1.3680043.8.498.7",
    sc_transfer_syntax="uncompressed",
)
SEGMENTATION = METHOD_TITLES["segmentation"]


def segmentation_map() -> np.ndarray:
    """A mask head's map at the model's size: a large region right, a smaller one left with
    a hole, and a speck under the minimum region size."""
    values = np.full((64, 64), 0.05, dtype=np.float32)
    yy, xx = np.mgrid[0:64, 0:64]
    values[(yy - 30) ** 2 + (xx - 44) ** 2 < 12**2] = 0.9
    values[10:30, 6:20] = 0.8
    values[17:22, 11:15] = 0.1
    values[55, 5] = 0.95
    return values


def node_context(tmp_path: Path, **analysis) -> NodeContext:
    config = write_config(tmp_path / "config.toml", {
        "storage": {"folder": str(tmp_path / "storage")},
        "analysis": {"enabled": True, **analysis},
        "peers": [],
    })
    return build_context(load_config(config))


def analysed(context: NodeContext, source: pydicom.Dataset, *, probability: float,
             heatmap: np.ndarray, method: str = SEGMENTATION) -> str:
    """Store `source`, claim its job and write its results as the worker would."""
    context.archive.store_dataset(source, is_result=False)
    (job,) = JobQueue(context.engine).claim("elsewhere:1:test", 1)
    label = "Pneumothorax" if probability >= MODEL.threshold else "No Pneumothorax"
    ResultWriter(context, MODEL).write(ResultTask(
        job=job, header=_header_only(source), grey8=read_grey8(source), probability=probability,
        label=label, heatmap=heatmap, method_title=method,
    ))
    return str(source.SOPInstanceUID)


def stored(context: NodeContext, uid: str) -> pydicom.Dataset:
    return pydicom.dcmread(context.archive.path_of(context.archive._existing_path(uid)))


def siim(relative: str = "train/Pneumothorax/000153.dcm") -> pydicom.Dataset:
    return pydicom.dcmread(siim_file(relative))


# --- the kinds as parts ---------------------------------------------------------------------


def test_every_kind_is_one_module_with_its_own_series() -> None:
    kinds = [kind_named(name) for name in available_kinds()]
    assert {kind.name for kind in kinds} >= {"sr", "seg", "sc"}
    assert len({kind.series_number for kind in kinds}) == len(kinds)
    for kind in kinds:
        assert set(kind.after) <= set(available_kinds()), kind.name
        assert kind.series_description and kind.series_title and kind.modality


def test_kinds_are_built_after_the_kinds_they_refer_to() -> None:
    assert [k.name for k in kinds_named(["sc", "sr", "seg"])] == ["seg", "sr", "sc"]
    assert [k.name for k in kinds_named(["sr", "sc"])] == ["sr", "sc"]
    assert [k.name for k in kinds_named(["sc"])] == ["sc"]


def test_uids_are_derived_per_kind_source_and_model() -> None:
    source = siim()
    sr, seg = KindUids.of("sr", source, "1.0"), KindUids.of("seg", source, "1.0")
    assert sr == KindUids.of("sr", source, "1.0")  # a retry replaces, never adds
    assert len({sr.series, sr.sop, seg.series, seg.sop}) == 4
    assert KindUids.of("sr", source, "2.0") != sr


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (["sr", "pdf"], "'pdf' is not a result kind"),
        (["sr", "sr"], "lists a kind twice"),
        ("sr", "must be a list of strings"),
    ],
)
def test_config_names_a_bad_result_list(tmp_path: Path, value, message: str) -> None:
    path = write_config(tmp_path / "config.toml", {"analysis": {"results": value}})
    with pytest.raises(ConfigError, match=f"analysis.results: .*{message}"):
        load_config(path)


def _items(dataset: pydicom.Dataset):
    for item in dataset.get("ContentSequence", []):
        yield item
        yield from _items(item)


# --- what the writer makes ------------------------------------------------------------------


def dsrdump(path: Path) -> str:
    if shutil.which("dsrdump") is None:
        pytest.skip("dsrdump (dcmtk) is not installed")
    result = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize(
    "make_source",
    [
        pytest.param(siim, id="siim-cr-jpeg"),
        pytest.param(lambda: dx_source("CT_small.dcm", geometry=True, frame=False),
                     id="dx-with-spacing-and-orientation"),
        pytest.param(lambda: dx_source("JPEG2000.dcm", geometry=False, frame=False),
                     id="dx-jpeg2000-without-them"),
    ],
)
def test_a_present_finding_gets_an_sr_with_regions_a_seg_and_an_sc(
    make_source, tmp_path: Path
) -> None:
    context = node_context(tmp_path)
    source = make_source()
    heatmap = segmentation_map()
    uid = analysed(context, source, probability=0.93, heatmap=heatmap)

    results = JobQueue(context.engine).results_of(uid)
    assert {kind: r.state for kind, r in results.items()} == {
        "sr": "stored", "seg": "stored", "sc": "stored"
    }
    sr, seg, sc = (stored(context, results[k].sop_instance_uid) for k in ("sr", "seg", "sc"))
    assert (sr.SOPClassUID, seg.SOPClassUID) == (ComprehensiveSRStorage, SegmentationStorage)
    for result in (sr, seg, sc):
        assert result.StudyInstanceUID == source.StudyInstanceUID
    assert (int(sr.SeriesNumber), int(seg.SeriesNumber), int(sc.SeriesNumber)) == (
        9002, 9003, 9001
    )
    for name, result in (("sr", sr), ("seg", seg)):
        path = tmp_path / f"{name}.dcm"
        pydicom.dcmwrite(path, result, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], name

    # The SEG's mask is the node's thresholded map on the source grid.
    expected = find_regions(heatmap, int(source.Rows), int(source.Columns))
    assert len(expected.regions) == 2  # the speck is left out
    mask, tracking, name, version, referenced = read_pneumothorax_seg(seg)
    assert np.array_equal(mask, expected.mask)  # IoU 1.0
    assert referenced == source.SOPInstanceUID
    shared = seg.SharedFunctionalGroupsSequence[0]  # what OHIF needs to open a SEG
    assert list(shared.PlaneOrientationSequence[0].ImageOrientationPatient) == [1, 0, 0, 0, 1, 0]
    spacing = source.get("PixelSpacing") or source.get("ImagerPixelSpacing")
    assert ("PixelMeasuresSequence" in shared) == (spacing is not None)

    # The SR outlines the same regions, references the SEG, and shares its tracking UID.
    finding = read_finding(sr)
    assert finding.present and finding.probability == pytest.approx(0.93)
    assert finding.threshold == MODEL.threshold and finding.algorithm_name == MODEL.name
    assert finding.algorithm_family == "Artificial Intelligence"
    assert finding.tracking_uid == tracking  # the largest region's group and the segment
    assert (finding.segmentation_uid, finding.segment_number) == (seg.SOPInstanceUID, 1)
    assert finding.referenced_sop_instance_uid == source.SOPInstanceUID
    assert len(finding.regions) == 2
    for outline, region in zip(finding.regions, expected.regions, strict=True):
        assert np.array_equal(outline[0], outline[-1])  # closed
        assert np.allclose(outline, region.outline)
        rows, columns = outline[:, 1], outline[:, 0]
        assert rows.min() >= 0 and rows.max() <= int(source.Rows)
        assert columns.min() >= 0 and columns.max() <= int(source.Columns)

    uids = {str(item.UID) for item in _items(sr) if item.get("ValueType") == "UIDREF"
            and item.ConceptNameCodeSequence[0].CodeValue == "112040"}
    assert tracking in uids and len(uids) == 2  # one tracking UID per outline

    dump = dsrdump(tmp_path / "sr.dcm")
    for text in ("Imaging Measurement Report", "36118008", "Algorithm Name",
                 "Algorithm Version", "Tracking Identifier", "Tracking Unique Identifier",
                 "POLYLINE", "Referenced Segment"):
        assert text in dump, text


def test_an_absent_finding_gets_no_seg_and_a_report_that_says_absent_first(
    tmp_path: Path
) -> None:
    context = node_context(tmp_path)
    uid = analysed(context, siim(), probability=0.2, heatmap=segmentation_map())
    results = JobQueue(context.engine).results_of(uid)
    assert results["seg"].state == "not_made" and results["seg"].reason == "finding absent"
    assert {results["sr"].state, results["sc"].state} == {"stored"}
    finding = read_finding(stored(context, results["sr"].sop_instance_uid))
    assert not finding.present and finding.regions == () and finding.segmentation_uid == ""


@pytest.mark.parametrize(
    ("heatmap", "method", "reason"),
    [
        (np.full((64, 64), PIXEL_THRESHOLD / 2, np.float32), SEGMENTATION, "no region"),
        (segmentation_map(), METHOD_TITLES["gradcam"], "no segmentation map"),
    ],
)
def test_a_present_finding_without_a_region_gets_no_seg(
    heatmap: np.ndarray, method: str, reason: str, tmp_path: Path
) -> None:
    context = node_context(tmp_path)
    uid = analysed(context, siim(), probability=0.9, heatmap=heatmap, method=method)
    results = JobQueue(context.engine).results_of(uid)
    assert results["seg"].state == "not_made" and reason in results["seg"].reason
    finding = read_finding(stored(context, results["sr"].sop_instance_uid))
    assert finding.present and finding.regions == ()


def test_a_kind_that_fails_fails_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ai.results.seg.kind as seg_kind

    def broken(*arguments, **keywords):
        raise RuntimeError("no memory for the mask")

    monkeypatch.setattr(seg_kind, "build_pneumothorax_seg", broken)
    context = node_context(tmp_path)
    uid = analysed(context, siim(), probability=0.93, heatmap=segmentation_map())
    results = JobQueue(context.engine).results_of(uid)
    assert results["seg"].state == "failed"
    assert "cannot build the segmentation: RuntimeError: no memory" in results["seg"].reason
    assert {results["sr"].state, results["sc"].state} == {"stored"}
    # The SR still outlines the regions, but references no SEG that does not exist.
    finding = read_finding(stored(context, results["sr"].sop_instance_uid))
    assert len(finding.regions) == 2 and finding.segmentation_uid == ""
    report = queue_report(context.engine)
    assert report.jobs == {JobState.FAILED.value: 1}  # so that `pneumonode retry` makes it
    status = format_report(report)
    assert "SEG failed 1" in status and f"{uid}: seg: cannot build the segmentation" in status


def test_only_the_configured_kinds_are_made(tmp_path: Path) -> None:
    context = node_context(tmp_path, results=["sr"])
    uid = analysed(context, siim(), probability=0.93, heatmap=segmentation_map())
    results = JobQueue(context.engine).results_of(uid)
    assert list(results) == ["sr"]
    assert read_finding(stored(context, results["sr"].sop_instance_uid)).segmentation_uid == ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="nudges are Linux-only")
@pytest.mark.parametrize(("destination", "nudged"), [("PACS", True), ("", False)])
def test_results_queued_for_delivery_nudge_the_result_sender(
    tmp_path: Path, destination: str, nudged: bool
) -> None:
    """The result sender (another process) hears of queued results at once; results that
    stay on the node (no destination: the source was imported) wake nobody."""
    config = write_config(tmp_path / "config.toml", {
        "storage": {"folder": str(tmp_path / "storage")},
        "analysis": {"enabled": True, "results": ["sr"]},
        "peers": [{"ae_title": "PACS", "host": "127.0.0.1", "port": 11112}],
        "delivery": {"destination": destination},
    })
    context = build_context(load_config(config))
    sender = NudgeListener(nudge_address(context.config.storage.folder, DELIVERIES_NUDGE))
    try:
        assert sender.listening
        source = dx_source("CT_small.dcm", geometry=True, frame=False)
        analysed(context, source, probability=0.93, heatmap=segmentation_map())
        assert sender.wait(0) is nudged
    finally:
        sender.close()
