"""The finding as a TID 1500 Measurement Report in a Comprehensive SR document, and its reader.

The SR is the machine-readable half of the result, read by PACS, Orthanc's viewers and OHIF
(an Imaging Measurement Report with an image library). Each measurement group says, in this
order: its tracking identifier and UID, the finding looked for (SCT Pneumothorax), whether it
is present or absent (before any number, so that no first line reads as positive), the
algorithm (TID 4019: family Artificial Intelligence, name, version, and its decision
threshold and heatmap method as parameters), and the classifier's probability.

- An absent finding, or one whose location the model cannot give: one TID 1501 group about
  the whole source image.
- A present finding with regions (`ai.results.regions`): one TID 1410 group per region, its
  outline a closed POLYLINE (last point = first) in the source image's pixel coordinates,
  and, when the SEG was made, a Referenced Segment item (an extension of the extensible
  template) pointing at the SEG segment that holds the same pixels. The largest region's
  group and the SEG segment share the finding's Tracking UID (each other region has its
  own, derived from it: OHIF draws one outline per tracking UID).

highdicom builds the report of the first source of a kind; the sources after it get that
report with their own values put in (`ai.results.sr.content`), at a tenth of the cost. A
report with regions (its shape differs per image) is built whole each time.
"""

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import highdicom as hd
import numpy as np
from highdicom.sr.utils import find_content_items
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from ai.results.attributes import (
    DEVICE,
    copy_patient_and_study,
    source_header,
    values_of,
)
from ai.results.sr.codes import (
    ABSENT,
    ALGORITHM_FAMILY,
    ARTIFICIAL_INTELLIGENCE,
    DEVICE_OBSERVER,
    PLAIN_CHEST_XRAY,
    PNEUMOTHORAX,
    PRESENT,
    PROBABILITY,
    REFERENCED_SEGMENT,
    UNITLESS,
)
from ai.results.sr.content import ReportTemplate, TemplateCache
from ai.results.validation import (
    require_new_instance,
    require_probability,
    require_source_image,
    require_text,
    require_uid,
)

logger = logging.getLogger(__name__)

FINDING_SERIES_DESCRIPTION = "Pneumothorax AI finding (not for diagnostic use)"
TRACKING_IDENTIFIER = "Pneumothorax classification"
REGION_IDENTIFIER = "Pneumothorax region"
_THRESHOLD_PARAMETER = "decision threshold="
_HEATMAP_PARAMETER = "heatmap method="
# CID 29 Acquisition Modality, by the code value a Modality attribute holds (CR, DX, ...).
_ACQUISITION_MODALITIES = {code.value: code for code in codes.cid29.concepts.values()}
_MODALITY = codes.DCM.Modality  # DCM 121139, the concept of the image library's entry


@dataclass(frozen=True)
class Finding:
    """What a Structured Report built by `build_finding_sr` says, read back from the dataset."""

    probability: float
    present: bool
    threshold: float | None
    referenced_sop_instance_uid: str
    referenced_sop_class_uid: str
    algorithm_name: str
    algorithm_version: str
    device_observer_uid: str | None
    heatmap_method: str = ""  # which method made the SC's heatmap, when the SR says
    tracking_uid: str = ""
    algorithm_family: str = ""  # the code meaning, e.g. "Artificial Intelligence"
    regions: tuple[np.ndarray, ...] = field(default=())  # closed outlines, (N, 2) column, row
    segmentation_uid: str = ""  # the SEG the regions reference, if any
    segment_number: int | None = None


@dataclass(frozen=True)
class SegmentReference:
    """The SEG segment that holds a finding's regions as a mask."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str  # in the source's study
    segment_number: int = 1

    def evidence(self, study_instance_uid: str) -> Dataset:
        """The SEG as the SR's evidence lists it (every referenced object must be listed)."""
        dataset = Dataset()
        dataset.StudyInstanceUID = study_instance_uid
        dataset.SeriesInstanceUID = self.series_instance_uid
        dataset.SOPClassUID = self.sop_class_uid
        dataset.SOPInstanceUID = self.sop_instance_uid
        return dataset


def _check_decision(probability: float, present: bool, threshold: float) -> None:
    if not isinstance(present, bool):
        raise ValueError(f"present must be a bool, got {present!r}")
    if probability != threshold and present != (probability >= threshold):
        raise ValueError(
            f"present={present} contradicts probability={probability} and threshold={threshold}"
        )


def _tracking_uid(sop_instance_uid: str) -> str:
    """Without one from the caller: derived from our own SOP Instance UID, so rebuilding the
    same SR gives the same content."""
    return generate_uid(entropy_srcs=[sop_instance_uid, "tracking"])


def _probability(probability: float) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=PROBABILITY, value=probability, unit=UNITLESS)


def _presence(present: bool) -> hd.sr.QualitativeEvaluation:
    return hd.sr.QualitativeEvaluation(name=PNEUMOTHORAX, value=PRESENT if present else ABSENT)


def _algorithm(name: str, version: str, parameters: list[str]) -> hd.sr.AlgorithmIdentification:
    """TID 4019 with its Algorithm Family row, which highdicom's class leaves out."""
    algorithm = hd.sr.AlgorithmIdentification(name=name, version=version, parameters=parameters)
    family = hd.sr.CodeContentItem(
        name=ALGORITHM_FAMILY,
        value=ARTIFICIAL_INTELLIGENCE,
        relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
    )
    algorithm.insert(0, family)
    return algorithm


def _presence_first(group: list) -> None:
    """Move the present/absent evaluation up to just after the finding looked for, before
    the algorithm and the probability (highdicom appends evaluations last)."""
    items = group[0].ContentSequence
    evaluation = next(i for i, item in enumerate(items) if item.ValueType == "CODE"
                      and item.ConceptNameCodeSequence[0].CodeValue == PNEUMOTHORAX.value)
    finding = next(i for i, item in enumerate(items) if item.ValueType == "CODE"
                   and item.ConceptNameCodeSequence[0].CodeValue == codes.DCM.Finding.value)
    moved = items.pop(evaluation)
    items.insert(finding + 1, moved)


def _measurement_group(
    source: Dataset,
    probability: float,
    present: bool,
    algorithm: hd.sr.AlgorithmIdentification,
    tracking_uid: str,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    tracking = hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=TRACKING_IDENTIFIER)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=PNEUMOTHORAX,
        algorithm_id=algorithm,
        measurements=[_probability(probability)],
        qualitative_evaluations=[_presence(present)],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=source.SOPClassUID,
                referenced_sop_instance_uid=source.SOPInstanceUID,
            )
        ],
    )
    _presence_first(group)
    return group


def _region_tracking_uid(tracking_uid: str, number: int) -> str:
    """The largest region carries the finding's own tracking UID (the SEG segment's); each
    other region one derived from it. OHIF merges groups that share a tracking UID and
    draws only the first outline, so each outline needs its own."""
    if number == 1:
        return tracking_uid
    return generate_uid(entropy_srcs=[tracking_uid, "region", str(number)])


def _region_groups(
    source: Dataset,
    probability: float,
    algorithm: hd.sr.AlgorithmIdentification,
    tracking_uid: str,
    regions: Sequence[np.ndarray],
    segmentation: SegmentReference | None,
) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    """One TID 1410 group per region of a present finding, the largest first."""
    groups = []
    for number, outline in enumerate(regions, start=1):
        tracking = hd.sr.TrackingIdentifier(
            uid=_region_tracking_uid(tracking_uid, number),
            identifier=f"{REGION_IDENTIFIER} {number} of {len(regions)}",
        )
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=np.asarray(outline, dtype=np.float32),
            source_image=hd.sr.SourceImageForRegion(
                referenced_sop_class_uid=source.SOPClassUID,
                referenced_sop_instance_uid=source.SOPInstanceUID,
            ),
        )
        group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            referenced_region=region,
            finding_type=PNEUMOTHORAX,
            algorithm_id=algorithm,
            measurements=[_probability(probability)],
            qualitative_evaluations=[_presence(True)],
        )
        _presence_first(group)
        if segmentation is not None:
            group[0].ContentSequence.append(
                hd.sr.ImageContentItem(
                    name=REFERENCED_SEGMENT,
                    referenced_sop_class_uid=segmentation.sop_class_uid,
                    referenced_sop_instance_uid=segmentation.sop_instance_uid,
                    referenced_segment_numbers=segmentation.segment_number,
                    relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
                )
            )
        groups.append(group)
    return groups


def _check_outline(name: str, outline: object) -> np.ndarray:
    points = np.asarray(outline, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or len(points) < 4:
        raise ValueError(f"{name} must be (N >= 4, 2) points (column, row), got {points.shape}")
    if not np.all(np.isfinite(points)) or points.min() < 0:
        raise ValueError(f"{name} must hold finite, non-negative coordinates")
    if not np.array_equal(points[0], points[-1]):
        raise ValueError(f"{name} must be closed: its last point must repeat the first")
    return points


class _FindingSR(hd.sr.ComprehensiveSR):
    """highdicom's Comprehensive SR, with patient and study copied from the checked header:
    highdicom's own copy looks the source's SOP class up in its table of IODs, fails for a
    class it does not know, and copies values whatever their validity."""

    def copy_patient_and_study_information(self, dataset: Dataset) -> None:
        copy_patient_and_study(self, dataset)


def _image_library_header(header: Dataset) -> Dataset:
    """The source as the Image Library (TID 1600) should describe it.

    For CR/DX highdicom adds the projection radiography descriptors (TID 1603), which need
    Patient Orientation and Imager Pixel Spacing; many chest X-rays (all of SIIM) lack them.
    Then the entry keeps only the generic descriptors (modality, rows, columns), by
    describing a copy of the header whose Modality is left empty; the modality itself is
    set from the source afterwards (`_set_library_modality`).
    """
    entry = Dataset()
    for keyword in (
        "SOPClassUID",
        "SOPInstanceUID",
        "Rows",
        "Columns",
        "FrameOfReferenceUID",
        "Modality",
        "PatientOrientation",
        "ImagerPixelSpacing",
    ):
        if keyword in header:
            entry.add(copy.deepcopy(header[keyword]))
    orientation = values_of(header, "PatientOrientation")
    spacing = [float(v) for v in values_of(header, "ImagerPixelSpacing")]
    if not (len(orientation) == 2 and len(spacing) == 2 and min(spacing) > 0):
        entry.Modality = ""
    return entry


def _content_items(dataset: Dataset):
    for item in dataset.get("ContentSequence", []):
        yield item
        yield from _content_items(item)


def _set_library_modality(sr: Dataset, header: Dataset) -> None:
    """highdicom codes an entry's modality from the SOP class (a Secondary Capture chest X-ray
    becomes OT); the entry should give the source's own Modality when CID 29 has it."""
    modality = values_of(header, "Modality")
    code = _ACQUISITION_MODALITIES.get(str(modality[0])) if modality else None
    if code is None:
        return
    for item in _content_items(sr):
        name = item.get("ConceptNameCodeSequence")
        if item.get("ValueType") == "CODE" and name and name[0].CodeValue == _MODALITY.value:
            item.ConceptCodeSequence = [hd.sr.CodedConcept.from_code(code)]


# The source's attributes that shape its report beyond the values a template fills in: the
# character set (the template's text is encoded in it), the acquisition equipment highdicom
# lists as contributing equipment, and the image library entry (checked separately).
_KIND_ATTRIBUTES = ("SpecificCharacterSet", "Modality", *DEVICE)
_TEMPLATES = TemplateCache()


def _source_kind(header: Dataset) -> tuple:
    """What two sources must share for one's report to be the other's with values replaced."""
    entry = _image_library_header(header)
    return (
        tuple((k, str(header.get(k))) for k in _KIND_ATTRIBUTES if k in header),
        tuple((e.keyword, str(e.value)) for e in entry if e.keyword != "SOPInstanceUID"
              and e.keyword != "FrameOfReferenceUID"),
        "FrameOfReferenceUID" in entry,
        "AcquisitionDateTime" in header,
    )


def _compose(header: Dataset, *, probability: float, present: bool, threshold: float,
             algorithm_name: str, algorithm_version: str, device_observer_name: str,
             device_observer_uid: str, device_observer_manufacturer: str,
             series_instance_uid: str, sop_instance_uid: str, series_number: int,
             instance_number: int, series_description: str, institution_name: str | None,
             software_version: str | None, heatmap_method: str | None = None,
             tracking_uid: str, regions: Sequence[np.ndarray] = (),
             segmentation: SegmentReference | None = None) -> Dataset:
    """The report as highdicom builds it from the checked header."""
    observer = hd.sr.ObserverContext(
        observer_type=DEVICE_OBSERVER,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_observer_uid,
            name=device_observer_name,
            manufacturer_name=device_observer_manufacturer,
        ),
    )
    algorithm = _algorithm(
        algorithm_name,
        algorithm_version,
        [f"{_THRESHOLD_PARAMETER}{threshold:g}"]
        + ([f"{_HEATMAP_PARAMETER}{heatmap_method}"] if heatmap_method else []),
    )
    if regions:
        groups = _region_groups(header, probability, algorithm, tracking_uid, regions,
                                segmentation)
    else:
        groups = [_measurement_group(header, probability, present, algorithm, tracking_uid)]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PLAIN_CHEST_XRAY,
        imaging_measurements=groups,
        referenced_images=[_image_library_header(header)],
    )
    evidence = [header]
    if segmentation is not None:
        evidence.append(segmentation.evidence(str(header.StudyInstanceUID)))
    sr = _FindingSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=device_observer_manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=institution_name,
        series_description=series_description,
        manufacturer_model_name=device_observer_name,
        software_versions=software_version,
    )
    _set_library_modality(sr, header)
    return sr


def build_finding_sr(
    source: Dataset,
    *,
    probability: float,
    present: bool,
    threshold: float,
    algorithm_name: str,
    algorithm_version: str,
    device_observer_name: str,
    device_observer_uid: str,
    device_observer_manufacturer: str,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
    series_description: str = FINDING_SERIES_DESCRIPTION,
    institution_name: str | None = None,
    software_version: str | None = None,
    reuse: bool = True,
    heatmap_method: str | None = None,
    tracking_uid: str | None = None,
    regions: Sequence[np.ndarray] = (),
    segmentation: SegmentReference | None = None,
) -> Dataset:
    """Build the Comprehensive SR (TID 1500) that reports the pneumothorax finding on `source`.

    `present` must agree with `probability` >= `threshold` (the threshold is recorded as an
    algorithm parameter). Same patient and study as the source; a new series. The node is the
    device observer and the equipment (Manufacturer, Model Name = observer name, and
    `software_version` as Software Versions). `heatmap_method` (e.g. "GradCAM") names what
    made the Secondary Capture's map, as a second algorithm parameter. With `reuse` (the
    default) the report of an earlier source of the same kind and model is reused with this
    source's values put in; without it highdicom builds the whole report.

    `tracking_uid` names the finding (the SEG's segment carries the same one; default:
    derived from `sop_instance_uid`). `regions` are the closed outlines of a present finding
    (`ai.results.regions.Region.outline`: column, row on the source's pixel grid), one group
    each; `segmentation` the SEG segment holding them as a mask, referenced from each group.
    """
    require_source_image("source", source)
    probability = require_probability("probability", probability)
    threshold = require_probability("threshold", threshold)
    _check_decision(probability, present, threshold)
    require_text("algorithm_name", algorithm_name)
    require_text("algorithm_version", algorithm_version)
    require_text("device_observer_name", device_observer_name)
    require_uid("device_observer_uid", device_observer_uid)
    require_text("device_observer_manufacturer", device_observer_manufacturer)
    require_new_instance(
        source,
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
        series_number=series_number,
        instance_number=instance_number,
        series_description=series_description,
        institution_name=institution_name,
    )
    if software_version is not None:
        require_text("software_version", software_version)
    tracking_uid = _tracking_uid(sop_instance_uid) if tracking_uid is None else tracking_uid
    require_uid("tracking_uid", tracking_uid)
    regions = [_check_outline(f"regions[{i}]", r) for i, r in enumerate(regions)]
    if regions and not present:
        raise ValueError("regions are given for an absent finding")
    if segmentation is not None:
        if not regions:
            raise ValueError("segmentation is referenced from the regions: give regions too")
        require_uid("segmentation.sop_instance_uid", segmentation.sop_instance_uid)
        require_uid("segmentation.series_instance_uid", segmentation.series_instance_uid)

    header = source_header(source)
    model = {
        "threshold": threshold,
        "algorithm_name": algorithm_name,
        "algorithm_version": algorithm_version,
        "device_observer_name": device_observer_name,
        "device_observer_uid": device_observer_uid,
        "device_observer_manufacturer": device_observer_manufacturer,
        "series_description": series_description,
        "institution_name": institution_name,
        "software_version": software_version,
        "heatmap_method": heatmap_method,
    }
    instance = {
        "series_instance_uid": series_instance_uid,
        "sop_instance_uid": sop_instance_uid,
        "series_number": series_number,
        "instance_number": instance_number,
    }
    if reuse and not regions:

        def make() -> ReportTemplate:
            report = _compose(header, probability=probability, present=present, **model,
                              **instance, tracking_uid=tracking_uid)
            return ReportTemplate.from_report(
                report, header, tracking_uid=tracking_uid,
                measurement=PROBABILITY, evaluation=PNEUMOTHORAX,
            )

        key = (tuple(model.items()), _source_kind(header))
        (measurement,) = _probability(probability)
        (evaluation,) = _presence(present)
        sr = _TEMPLATES.get(key, make).fill(
            header, tracking_uid=tracking_uid, measurement=measurement,
            evaluation=evaluation, **instance,
        )
    else:
        sr = _compose(header, probability=probability, present=present, **model, **instance,
                      tracking_uid=tracking_uid, regions=regions, segmentation=segmentation)
    logger.info(
        "built finding SR %s for source %s (probability %.4f, %s, %d regions)",
        sop_instance_uid,
        source.SOPInstanceUID,
        probability,
        "present" if present else "absent",
        len(regions),
    )
    return sr


def _text_value(group_item: Dataset, name: hd.sr.CodedConcept) -> list[str]:
    return [str(item.TextValue) for item in find_content_items(group_item, name=name)]


def _presence_of(group) -> bool:
    evaluations = group.get_qualitative_evaluations(name=PNEUMOTHORAX)
    if len(evaluations) != 1:
        raise ValueError(f"sr's measurement group has {len(evaluations)} presence evaluations")
    presence = evaluations[0].value
    if presence == PRESENT:
        return True
    if presence == ABSENT:
        return False
    raise ValueError(f"sr's pneumothorax evaluation is neither present nor absent: {presence}")


def _region_of(group) -> tuple[np.ndarray, Dataset]:
    """A TID 1410 group's outline and its reference to the source image."""
    roi = group.roi
    if roi is None or roi.graphic_type != hd.sr.GraphicTypeValues.POLYLINE:
        raise ValueError("sr's region group has no POLYLINE image region")
    return np.asarray(roi.value, dtype=np.float64), roi.ContentSequence[0].ReferencedSOPSequence[0]


def read_finding(sr: Dataset) -> Finding:
    """Read back the pneumothorax finding of an SR built by `build_finding_sr` (or any TID 1500
    report with one image measurement group of finding type Pneumothorax, or region groups
    of that finding type)."""
    if not isinstance(sr, Dataset):
        raise ValueError(f"sr must be a pydicom Dataset, got {type(sr).__name__}")
    try:
        report = hd.sr.MeasurementReport.from_sequence([sr])
    except (AttributeError, IndexError, ValueError) as error:
        raise ValueError(f"sr is not a TID 1500 Measurement Report: {error}") from error

    image_groups = report.get_image_measurement_groups(finding_type=PNEUMOTHORAX)
    region_groups = report.get_planar_roi_measurement_groups(finding_type=PNEUMOTHORAX)
    if len(image_groups) + bool(region_groups) != 1:
        raise ValueError(
            f"sr has {len(image_groups)} pneumothorax image groups and {len(region_groups)}"
            " region groups: expected one image group or region groups only"
        )
    groups = image_groups or region_groups
    group = groups[0]
    measurements = group.get_measurements(name=PROBABILITY)
    if len(measurements) != 1:
        raise ValueError("sr's measurement group needs one probability")
    present = _presence_of(group)
    regions: list[np.ndarray] = []
    if image_groups:
        sources = group.source_images
        if len(sources) != 1:
            raise ValueError("sr's measurement group needs one source image")
        source_uid = str(sources[0].referenced_sop_instance_uid)
        source_class = str(sources[0].referenced_sop_class_uid)
    else:
        references = []
        for region_group in region_groups:
            outline, reference = _region_of(region_group)
            regions.append(outline)
            references.append(reference)
        source_uid = str(references[0].ReferencedSOPInstanceUID)
        source_class = str(references[0].ReferencedSOPClassUID)
    segments = find_content_items(group[0], name=REFERENCED_SEGMENT)
    segment = segments[0].ReferencedSOPSequence[0] if segments else None

    names = _text_value(group[0], codes.DCM.AlgorithmName)
    versions = _text_value(group[0], codes.DCM.AlgorithmVersion)
    parameters = _text_value(group[0], codes.DCM.AlgorithmParameters)
    families = [
        str(item.ConceptCodeSequence[0].CodeMeaning)
        for item in find_content_items(group[0], name=ALGORITHM_FAMILY)
    ]
    thresholds = [
        float(p.removeprefix(_THRESHOLD_PARAMETER))
        for p in parameters
        if p.startswith(_THRESHOLD_PARAMETER)
    ]
    methods = [
        p.removeprefix(_HEATMAP_PARAMETER) for p in parameters if p.startswith(_HEATMAP_PARAMETER)
    ]
    devices = report.get_observer_contexts(observer_type=DEVICE_OBSERVER)

    return Finding(
        probability=float(measurements[0].value),
        present=present,
        threshold=thresholds[0] if thresholds else None,
        referenced_sop_instance_uid=source_uid,
        referenced_sop_class_uid=source_class,
        algorithm_name=names[0] if names else "",
        algorithm_version=versions[0] if versions else "",
        device_observer_uid=(
            str(devices[0].observer_identifying_attributes.uid) if devices else None
        ),
        heatmap_method=methods[0] if methods else "",
        tracking_uid=str(group.tracking_uid),
        algorithm_family=families[0] if families else "",
        regions=tuple(regions),
        segmentation_uid=str(segment.ReferencedSOPInstanceUID) if segment else "",
        segment_number=int(segment.ReferencedSegmentNumber) if segment else None,
    )
