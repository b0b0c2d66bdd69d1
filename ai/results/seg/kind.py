"""The DICOM Segmentation of the finding as a result kind, in series 9003: made only when the
finding is present and the mask head's map has a region above its pixel threshold (the
same region the SR outlines, `ai.results.regions`)."""

from __future__ import annotations

from pydicom.dataset import Dataset

from ai.results.errors import building
from ai.results.kind import (
    MANUFACTURER,
    KindUids,
    ResultInputs,
    ResultModel,
    ResultNotMade,
    new_instance,
)
from ai.results.seg.sop import SEGMENTATION_SERIES_DESCRIPTION, build_pneumothorax_seg


class FindingSegmentation:
    name = "seg"
    series_number = 9003
    series_description = SEGMENTATION_SERIES_DESCRIPTION
    series_title = "Segmentation (finding mask)"
    modality = "SEG"
    after = ()

    def build(self, inputs: ResultInputs, model: ResultModel, uids: KindUids) -> Dataset:
        from ai.results.regions import PIXEL_THRESHOLD

        if not inputs.present:
            raise ResultNotMade("finding absent")
        if inputs.segmentation is None:
            raise ResultNotMade(
                f"no segmentation map (the heatmap is {inputs.method_title}: a model without"
                " a mask head, or analysis.heatmap chose another method)"
            )
        if inputs.regions is None or not inputs.regions.found:
            raise ResultNotMade(f"no region of the mask head's map above {PIXEL_THRESHOLD}")
        with building("segmentation"):
            return build_pneumothorax_seg(
                inputs.header,
                inputs.regions.mask,
                algorithm_name=model.name,
                algorithm_version=model.version,
                tracking_uid=inputs.tracking_uid,
                **new_instance(self, inputs, uids),
                manufacturer=MANUFACTURER,
                model_name=model.name,
                software_version=model.version,
                series_description=self.series_description,
            )


KIND = FindingSegmentation()
