"""Builders of the DICOM objects that carry the classifier's result back into the PACS.

The heatmap goes out as a Secondary Capture (a picture any viewer shows), the finding as a
TID 1500 Structured Report (coded, machine readable). Both take plain numpy arrays and
scalars, so they do not depend on how the model produced them.
"""

from ai.results.errors import ResultBuildError
from ai.results.finding_sr import Finding, build_finding_sr, read_finding
from ai.results.heatmap_sc import HEATMAP_SERIES_DESCRIPTION, build_heatmap_sc
from ai.results.overlay import Picture, render_overlay, render_picture

__all__ = [
    "HEATMAP_SERIES_DESCRIPTION",
    "Finding",
    "Picture",
    "ResultBuildError",
    "build_finding_sr",
    "build_heatmap_sc",
    "read_finding",
    "render_overlay",
    "render_picture",
]
