"""The cheap paths of result building give what the plain ones give: the SR filled from a
template equals highdicom's own build, the per-level grey table equals the per-pixel
pipeline, the cached colour scale equals drawing it; and the choices (GPU decoding, the
number of result processes) are made as documented."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from support import siim_files
from test_results_robust import GREYSCALE, relabelled  # sources of every kind

import ai.results.sr.sop as finding_sr
from ai.data.preprocess import _grey8_of_values, gpu_decodable, to_grey8
from ai.results.kind import KindUids
from ai.results.sc import caption, picture
from ai.results.sr.sop import build_finding_sr, read_finding
from node.process.result_processes import result_process_count

_BUILD_TIMES = ("InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime")


def _sr_arguments(source: pydicom.Dataset, probability: float) -> dict:
    uids = KindUids.of("sr", source, "1.0")
    return {
        "probability": probability,
        "present": probability >= 0.5,
        "threshold": 0.5,
        "algorithm_name": "pneumonode test",
        "algorithm_version": "1.0",
        "device_observer_name": "PNEUMONODE",
        "device_observer_uid": "1.2.826.0.1.3680043.8.498.7",
        "device_observer_manufacturer": "pneumonode",
        "series_instance_uid": uids.series,
        "sop_instance_uid": uids.sop,
        "series_number": 9002,
        "instance_number": 1,
    }


def _without_build_times(sr: pydicom.Dataset) -> bytes:
    """The encoded report with the moments of building (which differ by design) blanked."""
    for keyword in _BUILD_TIMES:
        if keyword in sr:
            setattr(sr, keyword, "")
    for item in sr.get("ContributingEquipmentSequence", []):
        if item.PurposeOfReferenceCodeSequence[0].CodeValue == "109102":  # highdicom itself
            item.ContributionDateTime = ""
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _sources() -> list[pydicom.Dataset]:
    """SIIM images (one kind, many patients) and odd sources of other kinds."""
    sources = [pydicom.dcmread(path, stop_before_pixels=True) for path in siim_files()[:6]]
    for path in GREYSCALE[:8]:
        source = relabelled(path, "DX")
        source.Manufacturer = "ACME"
        source.AcquisitionDateTime = "20240102030405"
        # A second image of the same kind: the template of the first, its own values.
        twin = source.copy()
        twin.SOPInstanceUID, twin.SeriesInstanceUID = generate_uid(), generate_uid()
        twin.PatientID, twin.AcquisitionDateTime = "OTHER-PATIENT", "20250607080910"
        if "FrameOfReferenceUID" in twin:
            twin.FrameOfReferenceUID = generate_uid()
        sources += [source, twin]
    return sources


def test_a_reused_report_is_the_report_highdicom_builds() -> None:
    finding_sr._TEMPLATES.clear()
    for index, source in enumerate(_sources()):
        arguments = _sr_arguments(source, (index * 37 % 100) / 100)
        reused = build_finding_sr(source, **arguments)
        built = build_finding_sr(source, reuse=False, **arguments)
        assert _without_build_times(reused) == _without_build_times(built), source.filename
        finding = read_finding(reused)
        assert finding.referenced_sop_instance_uid == source.SOPInstanceUID
        assert finding.probability == arguments["probability"]
        assert finding.present == arguments["present"]


def test_highdicom_builds_one_report_per_kind_of_source(monkeypatch: pytest.MonkeyPatch) -> None:
    finding_sr._TEMPLATES.clear()
    composed: list[str] = []
    real = finding_sr._compose

    def counting(header, **arguments):
        composed.append(str(header.SOPInstanceUID))
        return real(header, **arguments)

    monkeypatch.setattr(finding_sr, "_compose", counting)
    siim = [pydicom.dcmread(path, stop_before_pixels=True) for path in siim_files()[:5]]
    reports = [build_finding_sr(source, **_sr_arguments(source, 0.2)) for source in siim]
    assert len(composed) == 1  # one SIIM kind: highdicom once, four reports filled in
    assert len({str(r.SOPInstanceUID) for r in reports}) == 5
    assert [str(r.PatientID) for r in reports] == [str(s.PatientID) for s in siim]
    # Another model (here: another threshold) is another template.
    build_finding_sr(siim[0], **{**_sr_arguments(siim[0], 0.2), "threshold": 0.3})
    assert len(composed) == 2


def _image(pixels: np.ndarray, photometric: str = "MONOCHROME2", **attributes) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = attributes.pop("BitsStored", ds.BitsAllocated)
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.tobytes()
    return ds


@pytest.mark.parametrize(
    ("bits", "photometric", "attributes"),
    [
        (8, "MONOCHROME2", {}),
        (8, "MONOCHROME1", {}),
        (12, "MONOCHROME2", {}),
        (12, "MONOCHROME2", {"WindowCenter": 1500, "WindowWidth": 1000}),
        (12, "MONOCHROME1", {"WindowCenter": 900, "WindowWidth": 300}),
        (12, "MONOCHROME2", {"RescaleSlope": 2, "RescaleIntercept": -1024}),
        (16, "MONOCHROME2", {"RescaleSlope": -0.5, "RescaleIntercept": 10}),
        (16, "MONOCHROME2", {"WindowCenter": 30000, "WindowWidth": 2000,
                             "VOILUTFunction": "SIGMOID"}),
    ],
)
def test_the_grey_table_gives_the_per_pixel_pipeline(bits: int, photometric: str,
                                                     attributes: dict) -> None:
    rng = np.random.default_rng(bits)
    dtype = np.uint8 if bits == 8 else np.uint16
    pixels = rng.integers(3, 2**bits - 5, (64, 48)).astype(dtype)
    ds = _image(pixels, photometric, BitsStored=bits, **attributes)
    np.testing.assert_array_equal(to_grey8(ds, pixels), _grey8_of_values(ds, pixels))


def test_a_cached_colour_scale_gives_the_same_band_showing_the_scale_colours() -> None:
    texts = picture.caption_texts(0.834, "Pneumothorax", "Pneumothorax probability", "model (1)",
                                  threshold=0.5)
    for width in (512, 700, 1024, 3000):
        caption._scale_block.cache_clear()
        first = caption.caption_band(width, texts, picture.colour_scale())
        again = caption.caption_band(width, texts, picture.colour_scale())  # from the cache
        assert caption._scale_block.cache_info().hits >= 1
        assert np.array_equal(first.pixels, again.pixels)
        assert first.lines == again.lines and first.tick_labels == again.tick_labels
        # The bar shows the scale's colours where the band says it is.
        left, top, right, bottom = first.scale_box
        bar = first.pixels[(top + bottom) // 2, left:right]
        values = (np.arange(right - left) + 0.5) / (right - left)
        assert np.array_equal(bar, picture.colour_scale().colours(values))


def test_the_gpu_decodes_only_plain_jpeg_baseline_for_a_cuda_model() -> None:
    siim = pydicom.dcmread(siim_files()[0], stop_before_pixels=True)
    assert siim.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert gpu_decodable(siim, "cuda") and gpu_decodable(siim, "cuda:1")
    assert not gpu_decodable(siim, "cpu")
    for change in ({"PhotometricInterpretation": "MONOCHROME1"}, {"WindowCenter": 100},
                   {"WindowWidth": 50, "WindowCenter": 100}, {"RescaleSlope": 2},
                   {"BitsStored": 12}, {"NumberOfFrames": 2}):
        changed = siim.copy()
        for keyword, value in change.items():
            setattr(changed, keyword, value)
        assert not gpu_decodable(changed, "cuda"), change
    uncompressed = siim.copy()
    uncompressed.file_meta = siim.file_meta.copy()
    uncompressed.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    assert not gpu_decodable(uncompressed, "cuda")


def test_the_gpu_decoding_call_gives_read_grey8s_pixels_on_the_cpu_decoder() -> None:
    """The nvJPEG path (frames out of the encapsulated Pixel Data, one batched torchvision
    call) run with torchvision's CPU decoder: only the CUDA device itself is untested here."""
    from ai.data.preprocess import decode_jpeg_on_gpu, read_grey8

    datasets = [pydicom.dcmread(path) for path in siim_files()[:3]]
    for ds, image in zip(datasets, decode_jpeg_on_gpu(datasets, "cpu"), strict=True):
        assert image.dtype == torch.uint8 and tuple(image.shape) == (ds.Rows, ds.Columns)
        np.testing.assert_array_equal(image.numpy(), read_grey8(ds))


def test_result_processes_default_to_every_core_but_the_workers() -> None:
    assert result_process_count(0, cpus=16) == 15
    assert result_process_count(0, cpus=2) == 1
    assert result_process_count(0, cpus=1) == 1
    assert result_process_count(3, cpus=16) == 3


def test_a_config_names_its_result_processes(tmp_path: Path) -> None:
    from node.config import ConfigError, load_config
    from node.testing.config_files import write_config

    assert load_config(write_config(tmp_path / "a.toml", {})).analysis.result_processes == 0
    path = write_config(tmp_path / "b.toml", {"analysis": {"result_processes": 4}})
    assert load_config(path).analysis.result_processes == 4
    with pytest.raises(ConfigError):
        load_config(write_config(tmp_path / "c.toml", {"analysis": {"result_processes": -1}}))


# --- the result processes: a job is done once its results are stored ---------------------


class _DiesWhenUnpickled:
    """Stands for an image whose results kill the process that builds them."""

    def __reduce__(self):
        import os

        return (os._exit, (3,))


def test_result_processes_store_results_and_give_back_the_job_of_one_that_died(
    tmp_path: Path,
) -> None:
    from sqlalchemy import select

    from ai.data.preprocess import read_grey8
    from ai.results.kind import ResultModel
    from node.config import load_config
    from node.context import build_context
    from node.process.result_processes import ResultPool, ResultTask
    from node.process.worker import _header_only
    from node.testing.config_files import write_config
    from storage.jobs import JobQueue
    from storage.models import AnalysisJob, JobResult

    config = load_config(write_config(tmp_path / "config.toml", {
        "storage": {"folder": str(tmp_path / "storage")},
        "analysis": {"enabled": True},
        "peers": [],
    }))
    context = build_context(config)
    paths = siim_files()[:2]
    for path in paths:
        context.archive.store_file_bytes(path.read_bytes(), calling_ae="STORESCU")
    jobs = JobQueue(context.engine)
    claimed = jobs.claim("elsewhere:1:test", 2)
    assert len(claimed) == 2
    model = ResultModel(name="test model", version="1.0", positive_class="Pneumothorax",
                        threshold=0.5, observer_name="PNEUMONODE",
                        observer_uid="1.2.826.0.1.3680043.8.498.7",
                        sc_transfer_syntax="uncompressed")
    by_uid = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in paths}
    good, doomed = claimed
    source = pydicom.dcmread(by_uid[good.sop_instance_uid])
    heatmap = np.zeros((8, 8), dtype=np.float32)
    pool = ResultPool(context, processes=1, limit=2)
    try:
        pool.submit(model, ResultTask(job=doomed, header=_header_only(source),
                                      grey8=_DiesWhenUnpickled(), probability=0.2,
                                      label="No Pneumothorax", heatmap=heatmap))
        assert pool.wait(120)
        pool.submit(model, ResultTask(job=good, header=_header_only(source),
                                      grey8=read_grey8(source), probability=0.7,
                                      label="Pneumothorax", heatmap=heatmap))
        assert pool.wait(120)
    finally:
        pool.close()
    with context.engine.connect() as conn:
        states = dict(conn.execute(select(AnalysisJob.id, AnalysisJob.state)).all())
        done = dict(conn.execute(
            select(JobResult.kind, JobResult.sop_instance_uid)
            .where(JobResult.job_pk == good.job_id, JobResult.state == "stored")
        ).all())
    assert str(states[doomed.job_id].value) == "queued"  # back in the queue, not lost
    assert str(states[good.job_id].value) == "done"
    assert set(done) == {"sr", "sc"}  # no SEG: the map is not a segmentation
    for uid in done.values():  # results stored and indexed before the job was marked done
        assert context.archive.path_of(context.archive._existing_path(uid)).is_file()


def test_a_pool_still_starting_does_not_hold_up_the_worker_stopping(tmp_path: Path) -> None:
    """Closing with nothing in flight ends processes that are still importing (`warm`)
    instead of waiting for them: under load that took longer than a supervisor waits."""
    import time

    from node.config import load_config
    from node.context import build_context
    from node.process.result_processes import ResultPool
    from node.testing.config_files import write_config

    config = load_config(write_config(tmp_path / "config.toml", {
        "storage": {"folder": str(tmp_path / "storage")},
        "analysis": {"enabled": True},
        "peers": [],
    }))
    pool = ResultPool(build_context(config), processes=2, limit=2)
    pool.warm()
    started = time.monotonic()
    pool.close()
    assert time.monotonic() - started < 10
