"""The one place where DICOM pixels become model input, shared by training and inference.

Training and inference must see exactly the same pixels, or a model validated in training
behaves differently in the node. Both call `read_grey8` (DICOM -> 8-bit grey, as a radiologist
would see it) and `resize_grey8` / `to_model_input` (8-bit grey -> normalised tensor).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array
from pydicom.uid import JPEGBaseline8Bit

GREYSCALE_PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")


class UnsupportedImageError(ValueError):
    """The input is not a single-frame greyscale DICOM image the classifier can read."""


def read_dataset(source: str | Path | pydicom.Dataset) -> pydicom.Dataset:
    """Open `source` (a path or an already parsed dataset) as a pydicom Dataset."""
    if isinstance(source, pydicom.Dataset):
        return source
    try:
        return pydicom.dcmread(str(source))
    except (InvalidDicomError, EOFError, OSError) as exc:
        raise UnsupportedImageError(f"{source}: not a readable DICOM file ({exc})") from exc


def check_single_frame_grey(ds: pydicom.Dataset, where: str = "dataset") -> None:
    """Refuse what the classifier was never trained on, with a message a user can act on."""
    if "PixelData" not in ds:
        raise UnsupportedImageError(f"{where}: has no Pixel Data (not an image)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise UnsupportedImageError(f"{where}: multi-frame image ({frames} frames)")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if samples != 1 or photometric not in GREYSCALE_PHOTOMETRICS:
        raise UnsupportedImageError(
            f"{where}: colour image ({photometric or 'unknown'}, {samples} samples per pixel);"
            " only MONOCHROME1/MONOCHROME2 are supported"
        )


def _display_range(ds: pydicom.Dataset, values: np.ndarray, modality_applied: bool) -> tuple:
    """The value range that maps to black..white after the VOI step.

    With a VOI LUT or window, that is the VOI output range (as pydicom defines it).
    Without one, 8-bit-or-less raw data keeps its nominal range, so an 8-bit file comes out
    unchanged (exactly what the seed's PILDicom gives); deeper data is stretched min..max.
    """
    voi_seq = ds.get("VOILUTSequence")
    if voi_seq and voi_seq[0].get("LUTData") is not None:
        lut = np.asarray(voi_seq[0].LUTData, dtype=np.float64).ravel()
        return float(lut.min()), float(lut.max())
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        probe = apply_voi_lut(np.array([-1e12, 1e12], dtype=np.float64), ds)
        return float(probe.min()), float(probe.max())
    bits_stored = int(ds.get("BitsStored", 8) or 8)
    if bits_stored <= 8 and not modality_applied and ds.get("PixelRepresentation", 0) == 0:
        return 0.0, float(2**bits_stored - 1)
    return float(values.min()), float(values.max())


def _has_modality_transform(ds: pydicom.Dataset) -> bool:
    if ds.get("ModalityLUTSequence"):
        return True
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return slope != 1.0 or intercept != 0.0


def decode_pixels(ds: pydicom.Dataset) -> np.ndarray:
    """The stored pixel values of a single-frame image.

    JPEG Baseline goes to Pillow (libjpeg-turbo), about three times faster than pydicom's
    default plugin (pylibjpeg) for a 1024² chest X-ray; the two IDCTs differ by at most 1 on
    a few percent of the pixels. Anything else, or a file Pillow refuses, is pydicom's choice.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID") == JPEGBaseline8Bit:
        try:
            return pixel_array(ds, decoding_plugin="pillow")
        except Exception:  # Pillow missing or refusing: pydicom's own plugins decide
            pass
    return ds.pixel_array


def gpu_decodable(ds: pydicom.Dataset, device: torch.device | str) -> bool:
    """Whether the model's GPU may decode `ds` itself: a CUDA device, and a JPEG Baseline
    single-frame 8-bit MONOCHROME2 image with no rescale, window or VOI LUT, whose decoded
    values are then exactly what `read_grey8` makes of them."""
    if torch.device(device).type != "cuda":
        return False
    meta = getattr(ds, "file_meta", None)
    return (
        meta is not None
        and meta.get("TransferSyntaxUID") == JPEGBaseline8Bit
        and int(ds.get("SamplesPerPixel", 1) or 1) == 1
        and str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME2"
        and int(ds.get("BitsStored", 8) or 8) == 8
        and int(ds.get("PixelRepresentation", 0) or 0) == 0
        and int(ds.get("NumberOfFrames", 1) or 1) == 1
        and not ds.get("ModalityLUTSequence")
        and not _has_modality_transform(ds)
        and ds.get("WindowCenter") is None
        and not ds.get("VOILUTSequence")
    )


def decode_jpeg_on_gpu(datasets: Sequence[pydicom.Dataset],
                       device: torch.device | str) -> list[torch.Tensor]:
    """HxW uint8 tensors on `device`: the frames of `gpu_decodable` datasets decoded by
    nvJPEG (torchvision) in one batched call. Never run in CI, which has no GPU."""
    from pydicom.encaps import generate_frames
    from torchvision.io import ImageReadMode, decode_jpeg

    frames = [
        torch.frombuffer(bytearray(next(generate_frames(ds.PixelData, number_of_frames=1))),
                         dtype=torch.uint8)
        for ds in datasets
    ]
    images = decode_jpeg(frames, mode=ImageReadMode.GRAY, device=torch.device(device))
    return [image[0] for image in images]


def _grey8_of_values(ds: pydicom.Dataset, raw: np.ndarray,
                     extremes: slice = slice(None)) -> np.ndarray:
    """The display pipeline on stored values: Modality LUT (or rescale), VOI LUT or first
    window, scaled to 0..255, MONOCHROME1 inverted. The values in `extremes` stand for the
    image's minimum and maximum (by default all of `raw`)."""
    modality_applied = _has_modality_transform(ds)
    values = apply_modality_lut(raw, ds) if modality_applied else raw
    values = np.asarray(apply_voi_lut(values, ds, prefer_lut=True))
    low, high = _display_range(ds, values[extremes], modality_applied)
    values = np.asarray(values, dtype=np.float64)
    scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    if str(ds.PhotometricInterpretation).upper() == "MONOCHROME1":
        grey = 255 - grey
    return grey


def to_grey8(ds: pydicom.Dataset, raw: np.ndarray) -> np.ndarray:
    """Stored values -> 8-bit grey as displayed (see `read_grey8`).

    Unsigned data goes through a table of one entry per stored level, computed by the same
    pipeline: every transform in it works value by value, so the result is identical, for
    256 or 4096 values instead of a million. Only the range used when there is no window
    needs the image's extremes, and rescaling (the one Modality transform allowed here) is
    monotonic, so those of the levels from the image's minimum to its maximum are the
    image's own. Signed data and Modality LUT tables take the per-pixel path.
    """
    if raw.dtype.kind != "u" or raw.dtype.itemsize > 2 or ds.get("ModalityLUTSequence"):
        return _grey8_of_values(ds, raw)
    low, high = int(raw.min()), int(raw.max())
    levels = np.arange(high + 1, dtype=raw.dtype)
    table = _grey8_of_values(ds, levels, extremes=slice(low, None))
    return table[raw]


def read_grey8(source: str | Path | pydicom.Dataset) -> np.ndarray:
    """Decode a single-frame greyscale DICOM to an HxW uint8 array, white = dense.

    Applies the Modality LUT (or rescale), the VOI LUT or first window, scales the result to
    0..255 and inverts MONOCHROME1. Compressed transfer syntaxes are decoded by Pillow
    (JPEG Baseline) or pydicom's pixel handlers (pylibjpeg, Pillow). Raises
    `UnsupportedImageError` for anything else.
    """
    ds = read_dataset(source)
    if isinstance(source, pydicom.Dataset):
        where = str(getattr(source, "filename", None) or "dataset")
    else:
        where = str(source)
    check_single_frame_grey(ds, where)
    try:
        raw = decode_pixels(ds)
    except Exception as exc:  # decoders raise many types; the user needs one clear message
        raise UnsupportedImageError(f"{where}: pixel data cannot be decoded ({exc})") from exc
    if raw.ndim != 2:
        raise UnsupportedImageError(f"{where}: expected a 2-D image, got shape {raw.shape}")
    return to_grey8(ds, raw)


def resize_grey8(images: Sequence[np.ndarray | torch.Tensor], size: int,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Resize 8-bit grey images to a (N, size, size) uint8 tensor on `device`.

    The whole image is squeezed to a square (as the seed's batch resize did), with
    antialiased bilinear interpolation, then rounded back to 8 bits so that training
    (which stores the resized image) and inference produce the same values.
    """
    out = torch.empty((len(images), size, size), dtype=torch.uint8, device=device)
    for index, image in enumerate(images):
        tensor = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor)
                                 else image)
        if tensor.ndim != 2 or tensor.dtype != torch.uint8:
            raise UnsupportedImageError(
                f"expected HxW uint8 grey images, got {tuple(tensor.shape)} {tensor.dtype}"
            )
        tensor = tensor.to(device, non_blocking=True)
        if tuple(tensor.shape) == (size, size):
            out[index] = tensor
            continue
        resized = F.interpolate(tensor[None, None].float(), size=(size, size), mode="bilinear",
                                align_corners=False, antialias=True)
        out[index] = resized[0, 0].round_().clamp_(0, 255).to(torch.uint8)
    return out


def normalise(batch_uint8: torch.Tensor, mean: float, std: float,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, H, W) or (N, 1, H, W) uint8 -> (N, 1, H, W) float: x/255, then (x - mean) / std."""
    x = batch_uint8 if batch_uint8.ndim == 4 else batch_uint8[:, None]
    x = x.to(dtype).div_(255.0)
    if mean != 0.0 or std != 1.0:
        x = x.sub_(mean).div_(std)
    return x


def to_model_input(images: Sequence[np.ndarray | torch.Tensor], size: int, mean: float = 0.0,
                   std: float = 1.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """8-bit grey images of any size -> the normalised (N, 1, size, size) float32 batch."""
    return normalise(resize_grey8(images, size, device), mean, std)
