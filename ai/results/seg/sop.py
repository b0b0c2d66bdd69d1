"""The pneumothorax region as a BINARY DICOM Segmentation (highdicom Segmentation), and its
reader.

The SEG is the mask a viewer draws over the X-ray itself: one segment "Pneumothorax" at the
source's own Rows x Columns, in the source's patient and study, a new series. It is made
only when the finding is present, so an empty mask is refused.

Projection X-rays (CR, DX, and SIIM's Secondary Captures) usually have no Frame of
Reference; none is made up for them (a source that has one shares it with its SEG). Either
way the source has no plane position, so the SEG holds one frame without plane positions,
and its General Image module needs a Patient Orientation (Type 2C): the source's own when
valid, else an empty value, which says "unknown" rather than inventing one.
"""

import copy
import logging
from typing import Literal, NamedTuple

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian

from ai.results.attributes import copy_patient_and_study, source_header, values_of
from ai.results.errors import building
from ai.results.sc.sop import UNPAIRED_BODY_PARTS
from ai.results.seg.codes import PNEUMOTHORAX
from ai.results.seg.content import pneumothorax_segment
from ai.results.validation import (
    require_new_instance,
    require_source_image,
    require_text,
    require_uid,
)

logger = logging.getLogger(__name__)

TransferSyntax = Literal["uncompressed"]

SEGMENTATION_SERIES_DESCRIPTION = "Pneumothorax AI segmentation (not for diagnostic use)"
CONTENT_LABEL = "PNEUMOTHORAX"  # Content Label is a CS: upper case, at most 16 characters
CONTENT_DESCRIPTION = "Pneumothorax region by an AI model, not for diagnostic use"  # LO: 64
# A program has no serial number; Device Serial Number is Type 1 in the Enhanced General
# Equipment module, so without one from the caller the SEG says so.
DEVICE_SERIAL_UNSTATED = "not stated"

# BINARY segments are 1 bit per pixel. highdicom 0.28 encodes them natively or as JPEG 2000
# and refuses RLE Lossless (its byte segments do not define 1-bit pixels), so the lossless
# syntax every PACS accepts, Explicit VR Little Endian, is the one offered: a packed
# 1024 x 1024 mask is 128 KiB.
_ENCODINGS: dict[str, str] = {"uncompressed": ExplicitVRLittleEndian}
_REFUSED_ENCODINGS = {
    "rle-lossless": "a BINARY segmentation is 1 bit per pixel, which RLE Lossless does not "
    "encode (highdicom refuses it); use 'uncompressed'",
}


class PneumothoraxSegment(NamedTuple):
    """What `read_pneumothorax_seg` reads back from a SEG."""

    mask: np.ndarray  # bool, the source's Rows x Columns
    tracking_uid: str
    algorithm_name: str
    algorithm_version: str
    referenced_sop_instance_uid: str


def _check_geometry(header: Dataset) -> tuple[int, int]:
    try:
        shape = int(header.Rows), int(header.Columns)
    except (AttributeError, TypeError, ValueError):
        raise ValueError("source lacks Rows and Columns, so the mask has no grid") from None
    if min(shape) < 1:
        raise ValueError(f"source has an empty image: Rows x Columns = {shape}")
    return shape


def _check_mask(mask: np.ndarray, shape: tuple[int, int]) -> None:
    if not isinstance(mask, np.ndarray):
        raise ValueError(f"mask must be a numpy array, got {type(mask).__name__}")
    if mask.dtype != np.bool_:
        raise ValueError(f"mask must be a bool array, got {mask.dtype}")
    if mask.shape != shape:
        raise ValueError(
            f"mask must have the source's Rows x Columns {shape}, got {mask.shape}"
        )
    if not mask.any():
        raise ValueError("mask is empty: a SEG is made only when the finding is present")


def _check_transfer_syntax(transfer_syntax: str) -> str:
    if transfer_syntax in _REFUSED_ENCODINGS:
        reason = _REFUSED_ENCODINGS[transfer_syntax]
        raise ValueError(f"transfer_syntax {transfer_syntax!r}: {reason}")
    if transfer_syntax not in _ENCODINGS:
        raise ValueError(
            f"transfer_syntax must be one of {sorted(_ENCODINGS)}, got {transfer_syntax!r}"
        )
    return _ENCODINGS[transfer_syntax]


def _shallow_copy(dataset: Dataset) -> Dataset:
    """A new Dataset holding the same elements: one can be removed or replaced (a new
    element, not a new value) in it without touching `dataset` (`copy.copy` of a pydicom
    Dataset shares its element dictionary)."""
    copied = Dataset()
    copied.update(dataset)
    if hasattr(dataset, "file_meta"):
        copied.file_meta = dataset.file_meta
    return copied


def _segmentation_source(header: Dataset) -> Dataset:
    """The header as highdicom should see it: without Pixel Spacing.

    From a source's Pixel Spacing highdicom writes a Pixel Measures item, which needs a
    Slice Thickness when the SEG shares its source's Frame of Reference; a projection
    image has none (and highdicom 0.28 cannot read back an item without one). The mask
    lies on the source's own grid, so a viewer measures it with the source's spacing.
    """
    source = _shallow_copy(header)
    if "PixelSpacing" in source:
        del source.PixelSpacing
    return source


_IDENTITY_ORIENTATION = [1, 0, 0, 0, 1, 0]  # rows along +x, columns along +y: the grid itself


def _pixel_spacing(header: Dataset) -> list | None:
    """The source's Pixel Spacing, else its Imager Pixel Spacing, when valid (two values > 0)."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            spacing = [float(v) for v in values_of(header, keyword)]
        except (TypeError, ValueError):
            continue
        if len(spacing) == 2 and min(spacing) > 0:
            return values_of(header, keyword)
    return None


def _set_plane_groups(seg: Dataset, header: Dataset) -> None:
    """The shared Pixel Measures and Plane Orientation groups of a SEG without a Frame of
    Reference, which highdicom leaves out for a projection image.

    The Segmentation IOD allows them there, and OHIF v3 cannot open a SEG without them (its
    SEG viewport reads PixelMeasures.SpacingBetweenSlices and ImageOrientationPatient: a
    TypeError, a blank viewport). The orientation says only that the mask's rows and columns
    are the source's own; the spacing is the source's, so a viewer measures the mask as it
    measures the X-ray. A source with no valid spacing gets no Pixel Measures group.
    """
    if "FrameOfReferenceUID" in seg:
        return  # highdicom wrote the source's own plane geometry
    shared = seg.SharedFunctionalGroupsSequence[0]
    spacing = _pixel_spacing(header)
    if spacing is not None and "PixelMeasuresSequence" not in shared:
        measures = Dataset()
        measures.PixelSpacing = spacing
        shared.PixelMeasuresSequence = [measures]
    if "PlaneOrientationSequence" not in shared:
        orientation = Dataset()
        orientation.ImageOrientationPatient = _IDENTITY_ORIENTATION
        shared.PlaneOrientationSequence = [orientation]


def _set_image_attributes(seg: Dataset, header: Dataset) -> None:
    """Body part, laterality and orientation as the source gives them.

    Laterality (General Series, Type 2C) belongs to a paired body part only: the source's
    R or L; left out for an unpaired body part (CHEST), and when the source names no side
    (dciodvfy refuses an empty one for a body part it does not know as paired, such as
    "WHOLE BODY"). Patient Orientation (Type 2C when there is no Plane
    Orientation, which a projection image never has) is the source's two values when
    valid, else empty; never made up.
    """
    if "BodyPartExamined" in header:
        seg.BodyPartExamined = header.BodyPartExamined
    side = [
        value
        for keyword in ("Laterality", "ImageLaterality")
        for value in values_of(header, keyword)
        if value in ("R", "L")
    ]
    body_part = [str(v).strip().upper() for v in values_of(header, "BodyPartExamined")]
    if side and not (body_part and body_part[0] in UNPAIRED_BODY_PARTS):
        seg.Laterality = side[0]
    orientation = values_of(header, "PatientOrientation")
    seg.PatientOrientation = orientation if len(orientation) == 2 else ""


def build_pneumothorax_seg(
    source: Dataset,
    mask: np.ndarray,
    *,
    algorithm_name: str,
    algorithm_version: str,
    tracking_uid: str,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
    manufacturer: str,
    model_name: str,
    software_version: str,
    series_description: str = SEGMENTATION_SERIES_DESCRIPTION,
    transfer_syntax: TransferSyntax = "uncompressed",
    institution_name: str | None = None,
    device_serial_number: str | None = None,
) -> Dataset:
    """Build the BINARY Segmentation of `mask` (bool, the source's Rows x Columns) on `source`.

    `source` may be the stored image or its `ai.results.attributes.source_header`; pixel data
    is not read. `tracking_uid` is the SR measurement group's, so both name one finding.
    The node (manufacturer, model name, software version) is the equipment; the algorithm
    (name, version, family Artificial Intelligence) identifies the segment's maker.
    Raises ValueError naming a bad argument, ResultBuildError when highdicom fails.
    """
    require_source_image("source", source)
    header = source_header(source)
    _check_mask(mask, _check_geometry(header))
    require_text("algorithm_name", algorithm_name)
    require_text("algorithm_version", algorithm_version)
    require_uid("tracking_uid", tracking_uid)
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
    if device_serial_number is not None:
        require_text("device_serial_number", device_serial_number)
    transfer_syntax_uid = _check_transfer_syntax(transfer_syntax)

    with building("segmentation"):
        seg = hd.seg.Segmentation(
            source_images=[_segmentation_source(header)],
            pixel_array=mask,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[
                pneumothorax_segment(
                    algorithm_name=algorithm_name,
                    algorithm_version=algorithm_version,
                    tracking_uid=tracking_uid,
                )
            ],
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            manufacturer=manufacturer,
            manufacturer_model_name=model_name,
            software_versions=software_version,
            device_serial_number=device_serial_number or DEVICE_SERIAL_UNSTATED,
            content_label=CONTENT_LABEL,
            content_description=CONTENT_DESCRIPTION,
            transfer_syntax_uid=transfer_syntax_uid,
            series_description=series_description,
            institution_name=institution_name,
        )
        copy_patient_and_study(seg, header)
        _set_image_attributes(seg, header)
        _set_plane_groups(seg, header)
    logger.info(
        "built pneumothorax SEG %s for source %s (%d pixels)",
        sop_instance_uid,
        header.SOPInstanceUID,
        int(mask.sum()),
    )
    return seg


def _readable_by_highdicom(ds: Dataset) -> Dataset:
    """`ds`, or a shallow copy whose shared Pixel Measures item is left out when it has no
    Slice Thickness: highdicom 0.28's reader demands one, where PS3.3 makes it Type 1C
    (volumes only), and a projection image has none (`_set_plane_groups`). The mask does
    not depend on it."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    if not shared or "PixelMeasuresSequence" not in shared[0]:
        return ds
    if all("SliceThickness" in item for item in shared[0].PixelMeasuresSequence):
        return ds
    readable = _shallow_copy(ds)
    groups = copy.deepcopy(shared[0])
    del groups.PixelMeasuresSequence
    # A new element, not a new value: the copy shares its elements with `ds`.
    tag = Tag("SharedFunctionalGroupsSequence")
    readable[tag] = DataElement(tag, "SQ", [groups])
    return readable


def read_pneumothorax_seg(ds: Dataset) -> PneumothoraxSegment:
    """Read back the pneumothorax segment of a SEG built by `build_pneumothorax_seg` (or any
    Segmentation of one source image with one segment of type SCT Pneumothorax)."""
    if not isinstance(ds, Dataset):
        raise ValueError(f"ds must be a pydicom Dataset, got {type(ds).__name__}")
    try:
        seg = hd.seg.Segmentation.from_dataset(_readable_by_highdicom(ds))
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"ds is not a DICOM Segmentation: {error}") from error
    numbers = seg.get_segment_numbers(segmented_property_type=PNEUMOTHORAX)
    if len(numbers) != 1:
        raise ValueError(f"ds has {len(numbers)} pneumothorax segments, expected 1")
    sources = seg.get_source_image_uids()
    if len(sources) != 1:
        raise ValueError(f"ds references {len(sources)} source images, expected 1")
    source_uid = str(sources[0][2])
    pixels = seg.get_pixels_by_source_instance([source_uid], segment_numbers=numbers)
    description = seg.get_segment_description(numbers[0])
    algorithm = description.algorithm_identification
    return PneumothoraxSegment(
        mask=pixels[0, :, :, 0].astype(bool),
        tracking_uid=str(description.tracking_uid or ""),
        algorithm_name=str(algorithm[0].AlgorithmName) if algorithm else "",
        algorithm_version=str(algorithm[0].AlgorithmVersion) if algorithm else "",
        referenced_sop_instance_uid=source_uid,
    )

