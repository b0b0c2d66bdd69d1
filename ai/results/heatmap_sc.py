"""The heatmap as a Secondary Capture Image (highdicom SCImage) in the source's study.

A Secondary Capture is the one image object every viewer and PACS displays, so it carries the
picture a reader looks at. The coded result travels separately in the Structured Report.
"""

import logging
from typing import Literal

import numpy as np
from highdicom import CoordinateSystemNames
from highdicom.sc import SCImage
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

from ai.results.codes import SOURCE_FOR_PROCESSING
from ai.results.validation import (
    require_new_instance,
    require_source_image,
    require_text,
)

logger = logging.getLogger(__name__)

TransferSyntax = Literal["uncompressed", "jpeg-baseline"]

HEATMAP_SERIES_DESCRIPTION = "Pneumothorax AI heatmap (not for diagnostic use)"
DERIVATION_DESCRIPTION = (
    "Class activation map (GradCAM) of a pneumothorax classifier, magma colormap at alpha 0.6 "
    "over the VOI-windowed source image; result text burned in. Not for diagnostic use."
)

# Photometric interpretation each transfer syntax needs for 8-bit colour (PS3.5 8.2.1).
_ENCODINGS: dict[str, tuple[str, str]] = {
    "uncompressed": (ExplicitVRLittleEndian, "RGB"),
    "jpeg-baseline": (JPEGBaseline8Bit, "YBR_FULL_422"),
}

# highdicom insists on a Patient Orientation when the coordinate system is PATIENT; when the
# source has none, the value is built with this one and then replaced by the source's empty
# Type 2 value, so that no orientation is invented.
_PLACEHOLDER_ORIENTATION = ("L", "F")


def _check_rgb(rgb: np.ndarray) -> None:
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3:
        shape = getattr(rgb, "shape", None)
        raise ValueError(f"rgb must be an array of shape (rows, columns, 3), got {shape}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be uint8, got {rgb.dtype}")
    if min(rgb.shape[:2]) < 1:
        raise ValueError(f"rgb is empty: {rgb.shape}")


def _source_orientation(source: Dataset) -> tuple[str, str] | None:
    orientation = source.get("PatientOrientation")
    if orientation is not None and len(orientation) == 2 and all(orientation):
        return str(orientation[0]), str(orientation[1])
    return None


def _source_image_reference(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = [CodedConcept.from_code(SOURCE_FOR_PROCESSING)]
    return item


def _as_list(value: object) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def _set_lossy_compression(sc: Dataset, source: Dataset, compressed_size: int | None) -> None:
    """Once lossy, always lossy (PS3.3 C.7.6.1.1.5): keep the source's history and add ours."""
    source_is_lossy = source.get("LossyImageCompression") == "01"
    methods = _as_list(source.get("LossyImageCompressionMethod")) if source_is_lossy else []
    ratios = _as_list(source.get("LossyImageCompressionRatio")) if source_is_lossy else []
    if compressed_size is not None:
        uncompressed_size = int(sc.Rows) * int(sc.Columns) * 3
        methods.append("ISO_10918_1")
        ratios.append(f"{uncompressed_size / compressed_size:.2f}")
    sc.LossyImageCompression = "01" if source_is_lossy or compressed_size is not None else "00"
    if methods:
        sc.LossyImageCompressionMethod = methods
    # Ratio values pair with method values; an unknown source ratio leaves ours unpaired.
    if ratios and len(ratios) == len(methods):
        sc.LossyImageCompressionRatio = ratios


def build_heatmap_sc(
    source: Dataset,
    rgb: np.ndarray,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
    manufacturer: str,
    model_name: str,
    software_version: str,
    transfer_syntax: TransferSyntax = "uncompressed",
    series_description: str = HEATMAP_SERIES_DESCRIPTION,
    institution_name: str | None = None,
) -> Dataset:
    """Build the heatmap Secondary Capture for `source` from the rendered `rgb` picture.

    Same patient and study as the source (highdicom `SCImage.from_ref_dataset`), a new series,
    RGB 8-bit, Burned In Annotation YES, the source referenced in Source Image Sequence.
    `transfer_syntax` is "uncompressed" (Explicit VR Little Endian, RGB) or "jpeg-baseline"
    (JPEG Baseline, YBR_FULL_422).
    """
    require_source_image("source", source)
    _check_rgb(rgb)
    require_new_instance(
        source,
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
        series_number=series_number,
        instance_number=instance_number,
        series_description=series_description,
        institution_name=institution_name,
    )
    require_text("manufacturer", manufacturer)
    require_text("model_name", model_name)
    require_text("software_version", software_version)
    if transfer_syntax not in _ENCODINGS:
        raise ValueError(
            f"transfer_syntax must be one of {sorted(_ENCODINGS)}, got {transfer_syntax!r}"
        )

    transfer_syntax_uid, photometric = _ENCODINGS[transfer_syntax]
    orientation = _source_orientation(source)
    same_size = (rgb.shape[0], rgb.shape[1]) == (source.get("Rows"), source.get("Columns"))
    spacing = source.get("PixelSpacing") if same_size else None

    sc = SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=np.ascontiguousarray(rgb),
        photometric_interpretation=photometric,
        bits_allocated=8,
        coordinate_system=CoordinateSystemNames.PATIENT,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        manufacturer_model_name=model_name,
        software_versions=software_version,
        institution_name=institution_name,
        series_description=series_description,
        pixel_spacing=tuple(float(v) for v in spacing) if spacing else None,
        patient_orientation=orientation or _PLACEHOLDER_ORIENTATION,
        transfer_syntax_uid=transfer_syntax_uid,
    )
    if orientation is None:
        sc.PatientOrientation = ""  # Type 2: unknown, as in the source

    # SC Equipment: made by a workstation from another image. Modality stays highdicom's OT:
    # a result image must not look like a CR/DX acquisition to routing rules, or a PACS that
    # forwards chest X-rays to this node would send the heatmap back for analysis.
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES"
    sc.DerivationDescription = DERIVATION_DESCRIPTION
    sc.SourceImageSequence = [_source_image_reference(source)]
    for keyword in ("BodyPartExamined", "Laterality"):
        if source.get(keyword):
            setattr(sc, keyword, source.get(keyword))

    compressed_size = None
    if sc.file_meta.TransferSyntaxUID.is_encapsulated:
        compressed_size = sum(len(f) for f in generate_frames(sc.PixelData, number_of_frames=1))
    _set_lossy_compression(sc, source, compressed_size)

    logger.info(
        "built heatmap SC %s for source %s (%s)",
        sop_instance_uid, source.SOPInstanceUID, transfer_syntax,
    )
    return sc

