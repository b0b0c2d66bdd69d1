"""The heatmap picture and its Secondary Capture, checked with the real validators and
renderers a PACS administrator would use (dicom3tools dciodvfy, dcmtk dcm2pnm/dcmj2pnm)."""

import os
import shutil
import subprocess
from pathlib import Path

import matplotlib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import JPEGBaseline8Bit, generate_uid
from support import assert_same_patient_and_study

from ai.preprocess import read_grey8
from ai.results import HEATMAP_SERIES_DESCRIPTION, build_heatmap_sc, render_overlay

pytestmark = pytest.mark.filterwarnings("ignore:The string .* person name:UserWarning")

SIIM_DIR = Path(
    os.environ.get(
        "PNEUMONODE_SIIM_DIR",
        Path(__file__).resolve().parents[1].parent / "shared" / "data" / "siim_small",
    )
)
SOURCE_FILES = ["train/Pneumothorax/000153.dcm", "train/No Pneumothorax/000000.dcm"]

# dciodvfy warnings that come from the SIIM source's own values, copied as they are
# (the same patient and study must be kept): Study ID is empty (Type 2) and Patient's Name is
# a UUID in one component (PN's retired single-component form).
EXPLAINED_WARNINGS = (
    "needed to build DICOMDIR - Study ID",
    "Patient's Name",
)


def read_source(relative: str) -> pydicom.Dataset:
    path = SIIM_DIR / relative
    if not path.exists():
        pytest.skip(f"SIIM data not found at {path}")
    return pydicom.dcmread(path)


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
    return render_overlay(display_grey(source), gaussian_heatmap(), 0.83, "Pneumothorax")


def test_overlay_blends_magma_at_alpha_06_over_the_grey_xray(source: pydicom.Dataset) -> None:
    grey = display_grey(source)
    heatmap = gaussian_heatmap()
    rgb = render_overlay(grey, heatmap, 0.83, "Pneumothorax")
    assert rgb.shape == (*grey.shape, 3)
    assert rgb.dtype == np.uint8

    # Independent reference, away from the text box: bilinear upsampling with pixel-centre
    # alignment, then matplotlib's magma at alpha 0.6 over the grey image.
    rows, columns = grey.shape
    for row, column in [(400, 650), (700, 300), (1000, 1000), (402, 694)]:
        y = (row + 0.5) * heatmap.shape[0] / rows - 0.5
        x = (column + 0.5) * heatmap.shape[1] / columns - 0.5
        y0, x0 = int(np.clip(np.floor(y), 0, 12)), int(np.clip(np.floor(x), 0, 12))
        fy, fx = np.clip(y - y0, 0, 1), np.clip(x - x0, 0, 1)
        value = (
            heatmap[y0, x0] * (1 - fy) * (1 - fx)
            + heatmap[y0, x0 + 1] * (1 - fy) * fx
            + heatmap[y0 + 1, x0] * fy * (1 - fx)
            + heatmap[y0 + 1, x0 + 1] * fy * fx
        )
        colour = np.array(matplotlib.colormaps["magma"](value)[:3]) * 255
        expected = 0.4 * float(grey[row, column]) + 0.6 * colour
        assert np.abs(rgb[row, column].astype(float) - expected).max() <= 3.0, (row, column)

    # The hot spot is bright and warm; the cold corner is the X-ray darkened, nearly grey.
    hot = rgb[402, 694].astype(int)
    assert hot[0] > 0.6 * 240 and hot[0] > hot[2] + 20
    cold = rgb[1000, 20].astype(int)
    assert abs(cold[0] - cold[1]) < 8


def test_overlay_burns_in_the_result_text_on_a_dark_box(source: pydicom.Dataset) -> None:
    grey = np.full((512, 512), 255, np.uint8)  # a white image: only the box can be dark
    rgb = render_overlay(grey, np.zeros((7, 7)), 0.125, "No pneumothorax")
    corner = rgb[:100, :300].astype(int)
    assert (corner[:60, :200].sum(axis=2) < 150).mean() > 0.5, "the text box is not dark"
    assert (corner.min(axis=2) > 200).any(), "no white text in the box"
    amber = (corner[..., 0] > 200) & (corner[..., 1] > 150) & (corner[..., 2] < 80)
    assert amber.any(), "the NOT FOR DIAGNOSTIC USE line is missing"
    # A different probability writes different pixels in the box, and only there.
    other = render_overlay(grey, np.zeros((7, 7)), 0.875, "No pneumothorax")
    changed = np.argwhere((other != rgb).any(axis=2))
    assert len(changed) > 0 and changed[:, 0].max() < 100 and changed[:, 1].max() < 400


def test_overlay_keeps_the_size_of_a_non_square_image() -> None:
    grey = np.tile(np.linspace(0, 255, 520, dtype=np.uint8), (300, 1))
    rgb = render_overlay(grey, gaussian_heatmap(7, (3.0, 3.0)), 0.5, "Pneumothorax")
    assert rgb.shape == (300, 520, 3)
    assert rgb[150, 260, 0] > rgb[150, 260, 2]  # the map's centre is warm


@pytest.mark.parametrize(
    ("change", "argument"),
    [
        ({"heatmap": np.zeros((4, 4, 3))}, "heatmap"),
        ({"heatmap": np.zeros((0, 4))}, "heatmap"),
        ({"heatmap": np.full((4, 4), 1.5)}, "heatmap"),
        ({"heatmap": np.full((4, 4), np.nan)}, "heatmap"),
        ({"heatmap": np.ones((4, 4), np.uint8)}, "heatmap"),
        ({"grey8": np.zeros((64, 64), np.float32)}, "grey8"),
        ({"grey8": np.zeros((64, 64, 3), np.uint8)}, "grey8"),
        ({"probability": 1.5}, "probability"),
        ({"probability": -0.01}, "probability"),
        ({"probability": float("nan")}, "probability"),
        ({"label": ""}, "label"),
    ],
)
def test_overlay_rejects_invalid_inputs(change: dict, argument: str) -> None:
    arguments = dict(
        grey8=np.zeros((64, 64), np.uint8),
        heatmap=np.zeros((4, 4)),
        probability=0.5,
        label="Pneumothorax",
    )
    arguments.update(change)
    with pytest.raises(ValueError, match=argument):
        render_overlay(**arguments)


@pytest.mark.parametrize("relative", SOURCE_FILES)
def test_uncompressed_sc_is_valid_and_renders_in_colour(relative: str, tmp_path: Path) -> None:
    source = read_source(relative)
    rgb = render_overlay(display_grey(source), gaussian_heatmap(), 0.42, "No pneumothorax")
    series_uid, sop_uid = generate_uid(), generate_uid()
    sc = build(source, rgb, series_instance_uid=series_uid, sop_instance_uid=sop_uid)
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
    reference = written.SourceImageSequence[0]
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert reference.ReferencedSOPClassUID == source.SOPClassUID
    assert reference.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
    assert np.array_equal(written.pixel_array, rgb)

    png = render_with_dcmtk("dcm2pnm", path, tmp_path / "sc.png")
    assert png.size == (source.Columns, source.Rows)
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
    assert png.size == (source.Columns, source.Rows)
    assert png.mode == "RGB"
    assert np.abs(np.asarray(png).astype(int) - overlay.astype(int)).mean() < 3.0


@pytest.mark.parametrize(
    ("change", "argument"),
    [
        ({"rgb": np.zeros((64, 64), np.uint8)}, "rgb"),
        ({"rgb": np.zeros((64, 64, 4), np.uint8)}, "rgb"),
        ({"rgb": np.zeros((64, 64, 3), np.float32)}, "rgb"),
        ({"transfer_syntax": "jpeg2000"}, "transfer_syntax"),
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
