"""Builders of the DICOM objects that carry the classifier's result back into the PACS.

The heatmap goes out as a Secondary Capture (a picture any viewer shows), the finding as a
TID 1500 Structured Report (coded, machine readable). Both take plain numpy arrays and
scalars, so they do not depend on how the model produced them.

One subpackage per object, the highdicom way (`sr/`, `sc/`: the object, its content, its
codes); what they share is here: the attributes copied from the source (`attributes`), the
argument checks (`validation`) and the one error a caller handles (`errors`).
"""

from ai.results.errors import ResultBuildError
from ai.results.sc.picture import Picture, render_overlay, render_picture
from ai.results.sc.sop import HEATMAP_SERIES_DESCRIPTION, build_heatmap_sc
from ai.results.sr.sop import Finding, build_finding_sr, read_finding

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
