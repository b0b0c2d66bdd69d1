"""The pneumothorax region as a DICOM Segmentation: the object and its reader (`sop`), the
segment's description (`content`) and its codes (`codes`)."""

from ai.results.seg.sop import (
    SEGMENTATION_SERIES_DESCRIPTION,
    PneumothoraxSegment,
    build_pneumothorax_seg,
    read_pneumothorax_seg,
)

__all__ = [
    "SEGMENTATION_SERIES_DESCRIPTION",
    "PneumothoraxSegment",
    "build_pneumothorax_seg",
    "read_pneumothorax_seg",
]
