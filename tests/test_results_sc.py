"""The heatmap Secondary Capture, checked with the real validators and renderers a PACS
administrator would use (dicom3tools dciodvfy, dcmtk dcm2pnm/dcmj2pnm). The picture itself
is tested in test_sc_picture.py."""

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import JPEGBaseline8Bit, generate_uid
from support import assert_same_patient_and_study, siim_file

from ai.data.preprocess import read_grey8
from ai.results.sc.picture import render_picture
from ai.results.sc.sop import HEATMAP_SERIES_DESCRIPTION, build_heatmap_sc

pytestmark = pytest.mark.filterwarnings("ignore:The string .* person name:UserWarning")

SOURCE_FILES = ["train/Pneumothorax/000153.dcm", "train/No Pneumothorax/000000.dcm"]

# dciodvfy warnings that come from the SIIM source's own values, copied as they are
# (the same patient and study must be kept): Study ID is empty (Type 2) and Patient's Name is
# a UUID in one component (PN's retired single-component form).
EXPLAINED_WARNINGS = (
    "needed to build DICOMDIR - Study ID",
    "Patient's Name",
)


def read_source(relative: str) -> pydicom.Dataset:
    return pydicom.dcmread(siim_file(relative))


def display_grey(source: pydicom.Dataset) -> np.ndarray:
    """The X-ray as the node displays it: the classifier's shared preprocessing."""
    return read_grey8(source)


def gaussian_heatmap(size: int = 14, centre: tuple[float, float] = (5.0, 9.0)) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / 8.0)


def run_dciodvfy(path: Path) -> list[str]:
    """Validate against the IOD; fail on any error, return the warnings."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line]
    assert not errors, "\n".join(lines)
    warnings = [line for line in lines if line.startswith("Warning")]
    unexplained = [w for w in warnings if not any(e in w for e in EXPLAINED_WARNINGS)]
    assert not unexplained, "\n".join(unexplained)
    return warnings


def render_with_dcmtk(program: str, path: Path, png: Path) -> Image.Image:
    if shutil.which(program) is None:
        pytest.skip(f"{program} (dcmtk) is not installed")
    result = subprocess.run(
        [program, "--write-png", str(path), str(png)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    assert result.returncode == 0, result.stderr
    image = Image.open(png)
    image.load()
    return image


def build(source: pydicom.Dataset, rgb: np.ndarray, **overrides) -> pydicom.Dataset:
    arguments = dict(
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        series_number=9001,
        instance_number=1,
        manufacturer="pneumonode project",
        model_name="pneumonode",
        software_version="0.1.0",
    )
    arguments.update(overrides)
    return build_heatmap_sc(source, rgb, **arguments)


@pytest.fixture(scope="module")
def source() -> pydicom.Dataset:
    return read_source(SOURCE_FILES[0])


@pytest.fixture(scope="module")
def overlay(source: pydicom.Dataset) -> np.ndarray:
    return render_picture(display_grey(source), gaussian_heatmap(), 0.83, "Pneumothorax",
                          threshold=0.5).rgb


@pytest.mark.parametrize("relative", SOURCE_FILES)
def test_uncompressed_sc_is_valid_and_renders_in_colour(relative: str, tmp_path: Path) -> None:
    source = read_source(relative)
    picture = render_picture(display_grey(source), gaussian_heatmap(), 0.42, "No pneumothorax",
                             threshold=0.5)
    rgb = picture.rgb
    series_uid, sop_uid = generate_uid(), generate_uid()
    sc = build(
        source,
        rgb,
        pixel_scale=picture.scale,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
    )
    path = tmp_path / "sc.dcm"
    pydicom.dcmwrite(path, sc, enforce_file_format=True)
    run_dciodvfy(path)

    written = pydicom.dcmread(path)
    assert written.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert written.SOPInstanceUID == sop_uid
    assert written.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert_same_patient_and_study(written, source)
    assert written.SeriesInstanceUID == series_uid != source.SeriesInstanceUID
    assert written.SeriesDescription == HEATMAP_SERIES_DESCRIPTION
    assert (written.PhotometricInterpretation, written.SamplesPerPixel) == ("RGB", 3)
    assert (written.BitsAllocated, written.BitsStored) == (8, 8)
    assert written.BurnedInAnnotation == "YES"
    assert written.ConversionType == "WSD"
    assert written.Modality == "OT"
    assert written.DerivationDescription
    assert written.LossyImageCompression == "01"  # the SIIM source was JPEG compressed
    assert written.PixelSpacing == source.PixelSpacing  # the X-ray's pixels, unscaled
    assert written.BodyPartExamined == "CHEST" and "Laterality" not in written  # unpaired
    reference = written.SourceImageSequence[0]
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert reference.ReferencedSOPClassUID == source.SOPClassUID
    assert reference.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
    assert np.array_equal(written.pixel_array, rgb)

    png = render_with_dcmtk("dcm2pnm", path, tmp_path / "sc.png")
    assert png.size == (source.Columns, picture.image_top + source.Rows)
    assert png.mode == "RGB"
    assert np.array_equal(np.asarray(png), rgb)


def test_jpeg_baseline_sc_is_valid_and_renders_in_colour(
    source: pydicom.Dataset, overlay: np.ndarray, tmp_path: Path
) -> None:
    sc = build(source, overlay, transfer_syntax="jpeg-baseline")
    path = tmp_path / "sc_jpeg.dcm"
    pydicom.dcmwrite(path, sc, enforce_file_format=True)
    run_dciodvfy(path)

    written = pydicom.dcmread(path)
    assert written.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert written.PhotometricInterpretation == "YBR_FULL_422"
    assert written.LossyImageCompression == "01"
    assert "ISO_10918_1" in written.LossyImageCompressionMethod
    assert path.stat().st_size < overlay.nbytes / 4
    decoded = written.pixel_array  # pydicom converts YBR to RGB
    assert decoded.shape == overlay.shape
    assert np.abs(decoded.astype(int) - overlay.astype(int)).mean() < 3.0

    # Debian's dcm2pnm has no JPEG decoder (it cannot render the SIIM sources either);
    # dcmj2pnm is dcmtk's JPEG-capable build of the same tool.
    png = render_with_dcmtk("dcmj2pnm", path, tmp_path / "sc_jpeg.png")
    assert png.size == (overlay.shape[1], overlay.shape[0])
    assert png.mode == "RGB"
    assert np.abs(np.asarray(png).astype(int) - overlay.astype(int)).mean() < 3.0


@pytest.mark.parametrize(
    ("change", "argument"),
    [
        ({"rgb": np.zeros((64, 64), np.uint8)}, "rgb"),
        ({"rgb": np.zeros((64, 64, 4), np.uint8)}, "rgb"),
        ({"rgb": np.zeros((64, 64, 3), np.float32)}, "rgb"),
        ({"transfer_syntax": "jpeg2000"}, "transfer_syntax"),
        ({"pixel_scale": 0}, "pixel_scale"),
        ({"series_instance_uid": "not a uid"}, "series_instance_uid"),
        ({"sop_instance_uid": ""}, "sop_instance_uid"),
        ({"series_number": 0}, "series_number"),
        ({"manufacturer": " "}, "manufacturer"),
        ({"software_version": ""}, "software_version"),
    ],
)
def test_sc_rejects_invalid_inputs(source: pydicom.Dataset, change: dict, argument: str) -> None:
    arguments = {"rgb": np.zeros((64, 64, 3), np.uint8), **change}
    rgb = arguments.pop("rgb")
    with pytest.raises(ValueError, match=argument):
        build(source, rgb, **arguments)


def test_sc_refuses_to_reuse_the_source_identity(
    source: pydicom.Dataset, overlay: np.ndarray
) -> None:
    with pytest.raises(ValueError, match="sop_instance_uid"):
        build(source, overlay, sop_instance_uid=source.SOPInstanceUID)
    with pytest.raises(ValueError, match="series_instance_uid"):
        build(source, overlay, series_instance_uid=source.SeriesInstanceUID)


def test_the_derivation_says_how_the_heat_follows_the_threshold(
    source: pydicom.Dataset, overlay: np.ndarray
) -> None:
    from ai.results.sc.picture import BELOW_THRESHOLD_STRENGTH, DEFAULT_ALPHA, HEAT_FLOOR

    gradcam = build(source, overlay).DerivationDescription
    assert gradcam.startswith("Class activation map (GradCAM)")
    # The numbers it states are the picture's own.
    assert f"at {BELOW_THRESHOLD_STRENGTH:g} x probability/threshold below it" in gradcam
    assert f"heat {HEAT_FLOOR:g} and below" in gradcam and f"to {DEFAULT_ALPHA:g}" in gradcam
    assert "threshold" in build(source, overlay, heatmap_method="CAM").DerivationDescription
    mask = build(source, overlay, heatmap_method="segmentation mask").DerivationDescription
    assert mask.startswith("Segmentation map") and "not rescaled" in mask
    assert len(gradcam) <= 1024 and len(mask) <= 1024  # ST
