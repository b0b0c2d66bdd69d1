"""The heatmap as a Secondary Capture Image (highdicom SCImage) in the source's study.

A Secondary Capture is the one image object every viewer and PACS displays, so it carries the
picture a reader looks at. The coded result travels separately in the Structured Report.
"""

import copy
import logging
from functools import lru_cache
from typing import Literal

import numpy as np
from highdicom import ContributingEquipment, CoordinateSystemNames
from highdicom.sc import SCImage
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.encaps import generate_frames
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

from ai.results.attributes import (
    EQUIPMENT,
    copy_patient_and_study,
    source_header,
    values_of,
)
from ai.results.sc.codes import SOURCE_FOR_PROCESSING
from ai.results.validation import (
    require_new_instance,
    require_source_image,
    require_text,
)

logger = logging.getLogger(__name__)

TransferSyntax = Literal["uncompressed", "jpeg-baseline"]

HEATMAP_SERIES_DESCRIPTION = "Pneumothorax AI heatmap (not for diagnostic use)"
DERIVATION_DESCRIPTION = (
    "Class activation map (GradCAM) of a pneumothorax classifier over the VOI-windowed "
    "source image: magma colours with an opacity rising from 0 (heat 0.2 and below, where "
    "the source pixels are unchanged) to 0.6 at heat 1. The map, relative to the image's own "
    "maximum, is drawn at full strength when the probability is at or above the model's "
    "threshold and at 0.5 x probability/threshold below it. Result, threshold, model and "
    "colour scale in a band above the image. Not for diagnostic use."
)
# A mask head's map is an absolute per-pixel probability: drawn as it is, whatever the result.
_SEGMENTATION_DESCRIPTION = (
    "Segmentation map (the model's pneumothorax mask head) over the VOI-windowed source "
    "image: each pixel's pneumothorax probability, not rescaled, in magma colours with an "
    "opacity rising from 0 (probability 0.2 and below, where the source pixels are "
    "unchanged) to 0.6 at 1. Result, threshold, model and colour scale in a band above the "
    "image. Not for diagnostic use."
)
# The map's maker as the description names it, by `ai.analysis.methods` method title.
_MAP_NAMES = {"GradCAM": "Class activation map (GradCAM)", "CAM": "Class activation map (CAM)"}


def derivation_description(heatmap_method: str) -> str:
    """What the picture shows and how its heat is scaled, for the map `heatmap_method` made."""
    if heatmap_method == "segmentation mask":
        return _SEGMENTATION_DESCRIPTION
    return DERIVATION_DESCRIPTION.replace(
        "Class activation map (GradCAM)", _MAP_NAMES.get(heatmap_method, heatmap_method), 1)


# Photometric interpretation each transfer syntax needs for 8-bit colour (PS3.5 8.2.1).
_ENCODINGS: dict[str, tuple[str, str]] = {
    "uncompressed": (ExplicitVRLittleEndian, "RGB"),
    "jpeg-baseline": (JPEGBaseline8Bit, "YBR_FULL_422"),
}

# highdicom insists on a Patient Orientation when the coordinate system is PATIENT and
# accepts single letters only; the value is built with this one and then replaced by the
# source's own (which may say "PF"), or by an empty Type 2 value, so none is invented.
_PLACEHOLDER_ORIENTATION = ("L", "F")

# Body Part Examined defined terms of unpaired structures (PS3.16 Annex L), for which
# Laterality must be absent; for any other body part it is required.
UNPAIRED_BODY_PARTS = frozenset(
    [
        "ABDOMEN",
        "ABDOMENPELVIS",
        "AORTA",
        "BACK",
        "BLADDER",
        "BRAIN",
        "CEREBELLUM",
        "CSPINE",
        "CTSPINE",
        "CERVIX",
        "CHEST",
        "CHESTABDOMEN",
        "CHESTABDPELVIS",
        "CIRCLEOFWILLIS",
        "COCCYX",
        "COLON",
        "CORONARYARTERY",
        "DUODENUM",
        "WHOLEBODY",
        "ESOPHAGUS",
        "FACE",
        "GALLBLADDER",
        "HEAD",
        "HEADNECK",
        "HEART",
        "ILEUM",
        "ILIUM",
        "JAW",
        "JEJUNUM",
        "LARYNX",
        "LIVER",
        "LSPINE",
        "LSSPINE",
        "MAXILLA",
        "MEDIASTINUM",
        "MOUTH",
        "NECK",
        "NECKCHEST",
        "NECKCHESTABDOMEN",
        "NECKCHESTABDPELV",
        "NOSE",
        "PANCREAS",
        "PELVIS",
        "PENIS",
        "PHARYNX",
        "PROSTATE",
        "RECTUM",
        "SSPINE",
        "SCALP",
        "SKULL",
        "SPINE",
        "SPLEEN",
        "STERNUM",
        "STOMACH",
        "TSPINE",
        "TLSPINE",
        "THYMUS",
        "THYROID",
        "TONGUE",
        "TRACHEA",
        "URETER",
        "URETHRA",
        "UTERUS",
        "VAGINA",
        "VULVA",
    ]
)


def _check_rgb(rgb: np.ndarray) -> None:
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3:
        shape = getattr(rgb, "shape", None)
        raise ValueError(f"rgb must be an array of shape (rows, columns, 3), got {shape}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be uint8, got {rgb.dtype}")
    if min(rgb.shape[:2]) < 1:
        raise ValueError(f"rgb is empty: {rgb.shape}")


def _source_image_reference(header: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = header.SOPClassUID
    item.ReferencedSOPInstanceUID = header.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = [CodedConcept.from_code(SOURCE_FOR_PROCESSING)]
    return item


def _pixel_spacing(header: Dataset, pixel_scale: int | None) -> tuple[float, float] | None:
    """The source's Pixel Spacing for the picture's pixels (each source pixel a block of
    `pixel_scale`), or None when the scale or the spacing is unknown."""
    spacing = [float(v) for v in values_of(header, "PixelSpacing")]
    if pixel_scale is None or len(spacing) != 2 or min(spacing) <= 0:
        return None
    return spacing[0] / pixel_scale, spacing[1] / pixel_scale


# What highdicom's ContributingEquipment.for_image_acquisition reads from a source.
_EQUIPMENT_KEYWORDS = ("SOPClassUID", *EQUIPMENT)


@lru_cache(maxsize=64)
def _equipment_of(values: tuple[tuple[str, object], ...]) -> ContributingEquipment | None:
    header = Dataset()
    for keyword, value in values:
        setattr(header, keyword, value)
    try:
        return ContributingEquipment.for_image_acquisition(header)
    except Exception:  # highdicom raises several types for a source without equipment
        return None


def _acquisition_equipment(header: Dataset) -> list[ContributingEquipment]:
    """The source's equipment as contributing equipment, when the source names it (as
    highdicom's `SCImage.from_ref_dataset` does).

    highdicom first looks the SOP class up in its IOD tables (a millisecond), then needs a
    Manufacturer: a source without one has none, and the equipment of a scanner is built
    once and copied.
    """
    if not values_of(header, "Manufacturer"):
        return []
    values = tuple(
        (k, tuple(v) if isinstance(v, MultiValue) else v)
        for k in _EQUIPMENT_KEYWORDS
        if k in header
        for v in [header[k].value]
    )
    equipment = _equipment_of(values)
    return [] if equipment is None else [copy.deepcopy(equipment)]


def _set_series_attributes(sc: Dataset, header: Dataset) -> None:
    """Body part and laterality as the source gives them.

    Laterality is Type 2C, required unless the body part is unpaired: the source's R or L
    is kept; for a named unpaired body part (CHEST) it is left out; otherwise (no body
    part, or a paired or unknown one) it is sent empty, which says "unknown".
    """
    if "BodyPartExamined" in header:
        sc.BodyPartExamined = header.BodyPartExamined
    side = [
        value
        for keyword in ("Laterality", "ImageLaterality")
        for value in values_of(header, keyword)
        if value in ("R", "L")
    ]
    body_part = [str(v).strip().upper() for v in values_of(header, "BodyPartExamined")]
    if side:
        sc.Laterality = side[0]
    elif not (body_part and body_part[0] in UNPAIRED_BODY_PARTS):
        sc.Laterality = ""
    orientation = values_of(header, "PatientOrientation")
    sc.PatientOrientation = orientation if len(orientation) == 2 else ""


def _set_lossy_compression(sc: Dataset, header: Dataset, compressed_size: int | None) -> None:
    """Once lossy, always lossy (PS3.3 C.7.6.1.1.5): keep the source's history and add ours."""
    source_is_lossy = values_of(header, "LossyImageCompression") == ["01"]
    methods = [str(v) for v in values_of(header, "LossyImageCompressionMethod")]
    ratios = [str(v) for v in values_of(header, "LossyImageCompressionRatio")]
    if not source_is_lossy:
        methods, ratios = [], []
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
    pixel_scale: int | None = None,
    transfer_syntax: TransferSyntax = "uncompressed",
    series_description: str = HEATMAP_SERIES_DESCRIPTION,
    institution_name: str | None = None,
    heatmap_method: str = "GradCAM",
) -> Dataset:
    """Build the heatmap Secondary Capture for `source` from the rendered `rgb` picture.

    `heatmap_method` names what made the map (an `ai.analysis.methods.METHOD_TITLES` value); the
    Derivation Description says it.

    Same patient and study as the source (its attributes copied as `ai.results.attributes`
    checks them), a new series, RGB 8-bit, Burned In Annotation YES, the source referenced
    in Source Image Sequence. `pixel_scale` says how many picture pixels one source pixel
    spans, so the source's Pixel Spacing can be carried over; None leaves it out.
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
    if pixel_scale is not None and (isinstance(pixel_scale, bool) or pixel_scale < 1):
        raise ValueError(f"pixel_scale must be a positive integer, got {pixel_scale!r}")

    header = source_header(source)
    transfer_syntax_uid, photometric = _ENCODINGS[transfer_syntax]
    sc = SCImage(
        pixel_array=np.ascontiguousarray(rgb),
        photometric_interpretation=photometric,
        bits_allocated=8,
        coordinate_system=CoordinateSystemNames.PATIENT,
        study_instance_uid=header.StudyInstanceUID,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        manufacturer_model_name=model_name,
        software_versions=software_version,
        institution_name=institution_name,
        series_description=series_description,
        pixel_spacing=_pixel_spacing(header, pixel_scale),
        patient_orientation=_PLACEHOLDER_ORIENTATION,
        transfer_syntax_uid=transfer_syntax_uid,
        contributing_equipment=_acquisition_equipment(header),
    )
    if "SpecificCharacterSet" in header:
        sc.SpecificCharacterSet = header.SpecificCharacterSet
    copy_patient_and_study(sc, header)
    _set_series_attributes(sc, header)

    # SC Equipment: made by a workstation from another image. Modality stays highdicom's OT:
    # a result image must not look like a CR/DX acquisition to routing rules, or a PACS that
    # forwards chest X-rays to this node would send the heatmap back for analysis.
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES"
    sc.DerivationDescription = derivation_description(heatmap_method)
    sc.SourceImageSequence = [_source_image_reference(header)]

    compressed_size = None
    if sc.file_meta.TransferSyntaxUID.is_encapsulated:
        compressed_size = sum(len(f) for f in generate_frames(sc.PixelData, number_of_frames=1))
    _set_lossy_compression(sc, header, compressed_size)

    logger.info(
        "built heatmap SC %s for source %s (%s)",
        sop_instance_uid,
        header.SOPInstanceUID,
        transfer_syntax,
    )
    return sc
