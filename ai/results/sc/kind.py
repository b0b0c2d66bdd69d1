"""The heatmap Secondary Capture as a result kind: the picture for viewers that show only
images, in series 9001."""

from __future__ import annotations

from pydicom.dataset import Dataset

from ai.results.errors import building
from ai.results.kind import MANUFACTURER, KindUids, ResultInputs, ResultModel, new_instance
from ai.results.sc.sop import HEATMAP_SERIES_DESCRIPTION


def _related_series(inputs: ResultInputs) -> list[str]:
    """Caption lines naming the structured results made for this image (built before the
    picture), so that a reader of the picture knows where to look."""
    return [f"{made.series_title}: series {made.series_number}" for made in inputs.made.values()]


class HeatmapSecondaryCapture:
    name = "sc"
    series_number = 9001
    series_description = HEATMAP_SERIES_DESCRIPTION
    series_title = "Heatmap picture"
    after = ("sr", "seg")
    modality = "OT"

    def build(self, inputs: ResultInputs, model: ResultModel, uids: KindUids) -> Dataset:
        from ai.results.sc.picture import render_picture
        from ai.results.sc.sop import build_heatmap_sc

        with building("heatmap picture"):
            picture = render_picture(
                inputs.grey8,
                inputs.heatmap,
                inputs.probability,
                inputs.label,
                threshold=model.threshold,
                related_series=_related_series(inputs),
                model=f"{model.name} ({model.version})",
                method=inputs.method_title,
            )
        with building("heatmap Secondary Capture"):
            return build_heatmap_sc(
                inputs.header,
                picture.rgb,
                pixel_scale=picture.scale,
                **new_instance(self, inputs, uids),
                manufacturer=MANUFACTURER,
                model_name=model.name,
                software_version=model.version,
                transfer_syntax=model.sc_transfer_syntax,
                heatmap_method=inputs.method_title,
            )


KIND = HeatmapSecondaryCapture()
