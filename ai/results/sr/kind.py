"""The finding Structured Report as a result kind: TID 1500, in series 9002."""

from __future__ import annotations

from pydicom.dataset import Dataset

from ai.results.errors import building
from ai.results.kind import MANUFACTURER, KindUids, ResultInputs, ResultModel
from ai.results.sr.sop import FINDING_SERIES_DESCRIPTION


class FindingStructuredReport:
    name = "sr"
    series_number = 9002
    series_description = FINDING_SERIES_DESCRIPTION
    series_title = "Structured report (finding, region)"
    modality = "SR"

    def build(self, inputs: ResultInputs, model: ResultModel, uids: KindUids) -> Dataset:
        from ai.results.sr.sop import build_finding_sr

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
                series_instance_uid=uids.series,
                sop_instance_uid=uids.sop,
                series_number=self.series_number,
                instance_number=inputs.instance_number,
            )


KIND = FindingStructuredReport()
