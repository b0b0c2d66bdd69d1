"""The finding Structured Report as a result kind: TID 1500, in series 9002."""

from __future__ import annotations

from pydicom.dataset import Dataset

from ai.results.errors import building
from ai.results.kind import MANUFACTURER, KindUids, ResultInputs, ResultModel, new_instance
from ai.results.sr.sop import FINDING_SERIES_DESCRIPTION


class FindingStructuredReport:
    name = "sr"
    series_number = 9002
    series_description = FINDING_SERIES_DESCRIPTION
    series_title = "Structured report (finding, region)"
    modality = "SR"
    after = ("seg",)  # its regions reference the SEG's segment

    def build(self, inputs: ResultInputs, model: ResultModel, uids: KindUids) -> Dataset:
        from ai.results.sr.sop import SegmentReference, build_finding_sr

        regions = inputs.regions.regions if inputs.regions is not None else ()
        seg = inputs.made.get("seg")
        segmentation = (
            SegmentReference(seg.sop_class_uid, seg.sop_instance_uid, seg.series_instance_uid)
            if seg is not None and regions
            else None
        )
        with building("finding Structured Report"):
            return build_finding_sr(
                inputs.header,
                probability=inputs.probability,
                present=inputs.present,
                threshold=model.threshold,
                algorithm_name=model.name,
                algorithm_version=model.version,
                heatmap_method=inputs.method_title,
                device_observer_name=model.observer_name,
                device_observer_uid=model.observer_uid,
                device_observer_manufacturer=MANUFACTURER,
                **new_instance(self, inputs, uids),
                tracking_uid=inputs.tracking_uid,
                regions=[region.outline for region in regions],
                segmentation=segmentation,
            )


KIND = FindingStructuredReport()
