"""Shared preprocessing: LUTs, MONOCHROME1, 16-bit input, and clear refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import FileMetaDataset
from pydicom.pixels import pixel_array
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from support import siim_file

from ai.data.preprocess import UnsupportedImageError, read_grey8, resize_grey8, to_model_input


def make_dicom(
    path: Path,
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    **attributes,
) -> Path:
    """Write an uncompressed single-frame (or multi-frame, if 3-D) DICOM file."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    samples = 3 if pixels.ndim == 3 and photometric == "RGB" else 1
    if pixels.ndim == 3 and samples == 1:
        ds.NumberOfFrames = pixels.shape[0]
    ds.Rows, ds.Columns = pixels.shape[-2:] if samples == 1 else pixels.shape[:2]
    ds.SamplesPerPixel = samples
    if samples == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated = bits
    ds.BitsStored = bits_stored or bits
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    for key, value in attributes.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def ramp(dtype, high: int, shape=(32, 48)) -> np.ndarray:
    return np.linspace(0, high, shape[0] * shape[1]).reshape(shape).astype(dtype)


def test_8bit_monochrome2_is_unchanged(tmp_path):
    pixels = ramp(np.uint8, 255)
    grey = read_grey8(make_dicom(tmp_path / "a.dcm", pixels))
    assert grey.dtype == np.uint8 and grey.shape == pixels.shape
    np.testing.assert_array_equal(grey, pixels)


def test_monochrome1_is_inverted(tmp_path):
    pixels = ramp(np.uint8, 255)
    grey = read_grey8(make_dicom(tmp_path / "a.dcm", pixels, "MONOCHROME1"))
    np.testing.assert_array_equal(grey, 255 - pixels)


def test_16bit_without_window_is_stretched(tmp_path):
    pixels = ramp(np.uint16, 3900) + 100
    grey = read_grey8(make_dicom(tmp_path / "a.dcm", pixels, bits_stored=12))
    assert grey.min() == 0 and grey.max() == 255
    assert np.all(np.diff(grey.ravel().astype(int)) >= 0)  # order is kept


def test_16bit_window_is_applied(tmp_path):
    pixels = np.array([[0, 1000, 1500, 2000, 4095]], dtype=np.uint16)
    path = make_dicom(
        tmp_path / "a.dcm", pixels, bits_stored=12, WindowCenter=1500, WindowWidth=1000
    )
    grey = read_grey8(path)
    assert grey[0, 0] == 0 and grey[0, 1] == 0  # below the window
    assert grey[0, 3] >= 254 and grey[0, 4] == 255  # above the window
    assert 120 <= grey[0, 2] <= 135  # the centre is mid-grey


def test_16bit_monochrome1_window_inverts(tmp_path):
    pixels = np.array([[0, 1500, 4095]], dtype=np.uint16)
    path = make_dicom(
        tmp_path / "a.dcm",
        pixels,
        "MONOCHROME1",
        bits_stored=12,
        WindowCenter=1500,
        WindowWidth=1000,
    )
    grey = read_grey8(path)
    assert grey[0, 0] == 255 and grey[0, 2] == 0


def test_rescale_then_window_in_output_units(tmp_path):
    # stored 1064 -> 1064 * 1 - 1024 = 40 units, the window's centre
    pixels = np.array([[0, 1064, 3000]], dtype=np.uint16)
    path = make_dicom(
        tmp_path / "a.dcm",
        pixels,
        bits_stored=12,
        RescaleSlope=1,
        RescaleIntercept=-1024,
        WindowCenter=40,
        WindowWidth=400,
    )
    grey = read_grey8(path)
    assert grey[0, 0] == 0 and grey[0, 2] == 255
    assert 120 <= grey[0, 1] <= 135


def test_dataset_input_is_accepted(tmp_path):
    pixels = ramp(np.uint8, 200)
    ds = pydicom.dcmread(make_dicom(tmp_path / "a.dcm", pixels))
    np.testing.assert_array_equal(read_grey8(ds), pixels)


@pytest.mark.parametrize("kind", ["multiframe", "rgb", "no_pixels", "not_dicom"])
def test_unsupported_input_is_refused_clearly(tmp_path, kind):
    path = tmp_path / "x.dcm"
    if kind == "multiframe":
        make_dicom(path, np.zeros((2, 8, 8), np.uint8))
        expected = "multi-frame"
    elif kind == "rgb":
        make_dicom(path, np.zeros((8, 8, 3), np.uint8), "RGB")
        expected = "colour"
    elif kind == "no_pixels":
        make_dicom(path, np.zeros((8, 8), np.uint8))
        ds = pydicom.dcmread(path)
        del ds.PixelData
        ds.save_as(path)
        expected = "no Pixel Data"
    else:
        path.write_bytes(b"not a dicom file at all")
        expected = "not a readable DICOM"
    with pytest.raises(UnsupportedImageError, match=expected):
        read_grey8(path)
    assert issubclass(UnsupportedImageError, ValueError)


def test_jpeg_baseline_siim_file_matches_decoded_pixels():
    path = siim_file("train/No Pneumothorax/000000.dcm")
    grey = read_grey8(path)
    assert grey.shape == (1024, 1024)
    # 8-bit data without a window comes out as decoded (by Pillow, see decode_pixels) ...
    ds = pydicom.dcmread(path)
    np.testing.assert_array_equal(grey, pixel_array(ds, decoding_plugin="pillow"))
    # ... which differs from pydicom's default decoder by at most 1 on a few pixels.
    difference = np.abs(grey.astype(int) - ds.pixel_array)
    assert difference.max() <= 1 and (difference > 0).mean() < 0.1


def test_resize_and_normalise():
    images = [ramp(np.uint8, 255, (100, 80)), np.full((64, 64), 255, np.uint8)]
    resized = resize_grey8(images, 64)
    assert resized.shape == (2, 64, 64) and resized.dtype == torch.uint8
    assert torch.all(resized[1] == 255)  # same size is passed through
    batch = to_model_input(images, 64, mean=0.5, std=0.25)
    assert batch.shape == (2, 1, 64, 64) and batch.dtype == torch.float32
    assert torch.allclose(batch[1], torch.full((1, 64, 64), 2.0))
    with pytest.raises(UnsupportedImageError):
        resize_grey8([np.zeros((4, 4), np.float32)], 8)
