"""The pneumothorax Segmentation: valid for dciodvfy from SIIM's CR and from DX sources (with
and without Imager Pixel Spacing, Patient Orientation and a Frame of Reference, JPEG and
uncompressed), in the source's patient and study, and read back by highdicom to the very
mask and tracking UID it was given."""

import shutil
import subprocess
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, SegmentationStorage, generate_uid
from support import assert_same_patient_and_study, siim_file

from ai.results.attributes import source_header
from ai.results.errors import ResultBuildError
from ai.results.seg.sop import (
    SEGMENTATION_SERIES_DESCRIPTION,
    build_pneumothorax_seg,
    read_pneumothorax_seg,
)
from node.testing.samples import DX

pytestmark = pytest.mark.filterwarnings(
    "ignore:The string .* person name:UserWarning",
    "ignore:Invalid value for VR:UserWarning",  # the invalid values these tests pass on purpose
)

SIIM_FILES = ["train/Pneumothorax/000153.dcm", "train/No Pneumothorax/000000.dcm"]
ALGORITHM = ("pneumonode xresnet50", "2024.1")


def dx_source(name: str, *, geometry: bool, frame: bool) -> pydicom.Dataset:
    """One of pydicom's test images as a chest DX would reach the node: its own UIDs, the
    DX SOP class, Imager Pixel Spacing and Patient Orientation or neither, and its Frame of
    Reference kept or left out."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(get_testdata_file(name))
    ds.SOPClassUID = DX
    ds.file_meta.MediaStorageSOPClassUID = DX
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "SliceLocation",
                    "ImagerPixelSpacing", "PatientOrientation"):
        if keyword in ds:
            delattr(ds, keyword)
    if geometry:
        ds.ImagerPixelSpacing = [0.139, 0.139]
        ds.PatientOrientation = ["P", "F"]
    if not frame and "FrameOfReferenceUID" in ds:
        del ds.FrameOfReferenceUID
    return ds


def region(rows: int, columns: int) -> np.ndarray:
    """An elliptic region, plus a corner pixel so the mask's edges are checked too."""
    yy, xx = np.mgrid[0:rows, 0:columns]
    distance = ((yy - rows * 0.4) / (rows * 0.2)) ** 2 + (
        (xx - columns * 0.6) / (columns * 0.15)
    ) ** 2
    mask = distance <= 1
    mask[rows - 1, columns - 1] = True
    return mask


def build(source: pydicom.Dataset, mask: np.ndarray | None = None, **overrides) -> pydicom.Dataset:
    arguments = dict(
        algorithm_name=ALGORITHM[0],
        algorithm_version=ALGORITHM[1],
        tracking_uid=generate_uid(),
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        series_number=9003,
        instance_number=1,
        manufacturer="pneumonode project",
        model_name="pneumonode",
        software_version="0.1.0",
    )
    arguments.update(overrides)
    if mask is None:
        mask = region(int(source.Rows), int(source.Columns))
    return build_pneumothorax_seg(source, mask, **arguments)


def dciodvfy_errors(path: Path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]


def check_valid_and_read_back(source: pydicom.Dataset, tmp_path: Path, *, header: bool) -> None:
    mask = region(int(source.Rows), int(source.Columns))
    tracking_uid, series_uid, sop_uid = generate_uid(), generate_uid(), generate_uid()
    seg = build(
        source_header(source) if header else source,
        mask,
        tracking_uid=tracking_uid,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
    )
    path = tmp_path / "seg.dcm"
    pydicom.dcmwrite(path, seg, enforce_file_format=True)
    errors = dciodvfy_errors(path)
    assert not errors, "\n".join(errors)

    written = pydicom.dcmread(path)
    assert written.SOPClassUID == SegmentationStorage
    assert written.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert (written.SOPInstanceUID, written.SeriesInstanceUID) == (sop_uid, series_uid)
    assert written.Modality == "SEG"
    assert written.SeriesDescription == SEGMENTATION_SERIES_DESCRIPTION
    assert (written.SegmentationType, written.NumberOfFrames) == ("BINARY", 1)
    assert_same_patient_and_study(written, source)
    assert ("FrameOfReferenceUID" in written) == ("FrameOfReferenceUID" in source)
    if "FrameOfReferenceUID" in source:
        assert written.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert written.PatientOrientation == source.get("PatientOrientation", "")

    (segment,) = written.SegmentSequence
    assert segment.SegmentLabel == "Pneumothorax"
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    category = segment.SegmentedPropertyCategoryCodeSequence[0]
    kind = segment.SegmentedPropertyTypeCodeSequence[0]
    assert (category.CodeValue, category.CodingSchemeDesignator) == ("49755003", "SCT")
    assert (kind.CodeValue, kind.CodingSchemeDesignator) == ("36118008", "SCT")
    (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
    family = algorithm.AlgorithmFamilyCodeSequence[0]
    assert (family.CodeValue, family.CodingSchemeDesignator) == ("123110", "DCM")
    assert (segment.TrackingID, segment.TrackingUID) == ("Pneumothorax region", tracking_uid)

    read = read_pneumothorax_seg(written)
    assert read.mask.shape == mask.shape and read.mask.dtype == np.bool_
    union = np.logical_or(read.mask, mask).sum()
    assert np.logical_and(read.mask, mask).sum() / union == 1.0  # IoU on the source grid
    assert read.tracking_uid == tracking_uid
    assert (read.algorithm_name, read.algorithm_version) == ALGORITHM
    assert read.referenced_sop_instance_uid == source.SOPInstanceUID


@pytest.mark.parametrize("relative", SIIM_FILES)
def test_seg_from_a_siim_cr_jpeg_source(relative: str, tmp_path: Path) -> None:
    source = pydicom.dcmread(siim_file(relative))
    assert source.file_meta.TransferSyntaxUID.is_compressed
    assert "FrameOfReferenceUID" not in source and not source.get("PatientOrientation")
    check_valid_and_read_back(source, tmp_path, header=relative == SIIM_FILES[0])


@pytest.mark.parametrize("frame", [True, False], ids=["frame", "no-frame"])
@pytest.mark.parametrize("geometry", [True, False], ids=["geometry", "no-geometry"])
@pytest.mark.parametrize("name", ["CT_small.dcm", "JPEG-lossy.dcm"])
def test_seg_from_dx_sources(name: str, geometry: bool, frame: bool, tmp_path: Path) -> None:
    source = dx_source(name, geometry=geometry, frame=frame)
    check_valid_and_read_back(source, tmp_path, header=geometry)


def test_seg_leaves_out_a_malformed_patient_age() -> None:
    source = pydicom.dcmread(siim_file(SIIM_FILES[0]), stop_before_pixels=True)
    source.PatientAge = "34"  # not a valid AS ("034Y")
    assert "PatientAge" not in build(source)
    source.PatientAge = "034Y"
    assert build(source).PatientAge == "034Y"


def test_seg_keeps_a_side_only_for_a_paired_body_part() -> None:
    source = dx_source("CT_small.dcm", geometry=True, frame=False)
    source.ImageLaterality = "L"
    assert "Laterality" not in build(source)  # CHEST is unpaired
    source.BodyPartExamined = "SHOULDER"
    assert build(source).Laterality == "L"


@pytest.mark.parametrize(
    ("change", "argument"),
    [
        ({"algorithm_name": ""}, "algorithm_name"),
        ({"algorithm_version": "  "}, "algorithm_version"),
        ({"tracking_uid": "region-1"}, "tracking_uid"),
        ({"series_instance_uid": "1.2.x"}, "series_instance_uid"),
        ({"sop_instance_uid": ""}, "sop_instance_uid"),
        ({"series_number": 0}, "series_number"),
        ({"instance_number": -1}, "instance_number"),
        ({"manufacturer": ""}, "manufacturer"),
        ({"model_name": "a\\b"}, "model_name"),
        ({"software_version": None}, "software_version"),
        ({"series_description": "x" * 65}, "series_description"),
        ({"device_serial_number": ""}, "device_serial_number"),
        ({"transfer_syntax": "rle-lossless"}, "transfer_syntax 'rle-lossless': a BINARY"),
        ({"transfer_syntax": "jpeg-baseline"}, "transfer_syntax"),
    ],
)
def test_seg_rejects_invalid_arguments(change: dict, argument: str) -> None:
    source = dx_source("CT_small.dcm", geometry=False, frame=False)
    with pytest.raises(ValueError, match=argument):
        build(source, **change)


@pytest.mark.parametrize(
    "mask",
    [
        np.ones((64, 64), bool),  # not the source's 128 x 128
        np.ones((128, 128), np.uint8),  # not bool
        np.ones((1, 128, 128), bool),
        [[True]],
    ],
    ids=["shape", "dtype", "frames", "list"],
)
def test_seg_rejects_a_mask_off_the_source_grid(mask) -> None:
    source = dx_source("CT_small.dcm", geometry=False, frame=False)
    with pytest.raises(ValueError, match="mask"):
        build(source, mask)


def test_seg_refuses_an_empty_mask() -> None:
    source = dx_source("CT_small.dcm", geometry=False, frame=False)
    with pytest.raises(ValueError, match="mask is empty"):
        build(source, np.zeros((128, 128), bool))


def test_seg_refuses_a_source_without_identity_or_grid() -> None:
    source = dx_source("CT_small.dcm", geometry=False, frame=False)
    del source.SOPInstanceUID
    with pytest.raises(ValueError, match="source lacks a valid SOPInstanceUID"):
        build(source, np.ones((128, 128), bool))
    source = dx_source("CT_small.dcm", geometry=False, frame=False)
    del source.Rows
    with pytest.raises(ValueError, match="source lacks Rows"):
        build(source, np.ones((128, 128), bool))


def test_seg_names_itself_when_highdicom_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*arguments, **keywords):
        raise TypeError("something deep inside")

    monkeypatch.setattr(hd.seg, "Segmentation", fail)
    with pytest.raises(ResultBuildError, match="cannot build the segmentation: TypeError"):
        build(dx_source("CT_small.dcm", geometry=False, frame=False))


def test_read_refuses_what_is_not_a_segmentation() -> None:
    source = dx_source("CT_small.dcm", geometry=False, frame=False)
    with pytest.raises(ValueError, match="ds is not a DICOM Segmentation"):
        read_pneumothorax_seg(source)
    with pytest.raises(ValueError, match="ds must be a pydicom Dataset"):
        read_pneumothorax_seg("seg.dcm")
