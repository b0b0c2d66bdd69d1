"""A Structured Report built by highdicom once, then given to every source of the same kind.

highdicom takes about 20 ms to build the finding report, nearly all of it on what is the
same for every image of a model: observer, algorithm, codes, the document's structure. So
the report of the first source of a kind is built by highdicom and encoded; for each later
source that encoding is read back (pydicom leaves its sequences undecoded, so writing them
again is a copy) and only what is the source's own is put in: identity and dates, patient
and study, evidence, the references to the source image and its frame of reference, the
tracking UID, and the measurement and evaluation items, which highdicom builds per image.
The caller decides what "the same kind" means (`ai.results.sr.sop`); the tests compare
a filled report with highdicom's own, element by element.
"""

from __future__ import annotations

import datetime
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass

from pydicom import Dataset, dcmread, dcmwrite
from pydicom.filebase import DicomBytesIO
from pydicom.sr.coding import Code
from pydicom.valuerep import DA, DT, TM

from ai.results.attributes import CLINICAL_TRIAL_SUBJECT, PATIENT_STUDY, copy_patient_and_study

ContentPath = tuple[int, ...]  # indices into nested Content Sequences, from the document root

# Contributing equipment: highdicom itself (its contribution time is the build's) and the
# source's acquisition equipment (its time is the source's Acquisition DateTime).
_PROCESSING_EQUIPMENT = "109102"
_ACQUISITION_EQUIPMENT = "109101"


def encode(dataset: Dataset) -> bytes:
    """The dataset as a DICOM file in memory (its own transfer syntax)."""
    buffer = DicomBytesIO()
    dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


def _walk(items, path: ContentPath = ()) -> Iterator[tuple[ContentPath, Dataset]]:
    for index, item in enumerate(items):
        here = (*path, index)
        yield here, item
        yield from _walk(item.get("ContentSequence", []), here)


def _named(item: Dataset, concept: Code) -> bool:
    name = item.get("ConceptNameCodeSequence")
    return bool(name) and (name[0].CodeValue, name[0].CodingSchemeDesignator) == (
        concept.value,
        concept.scheme_designator,
    )


def _at(root: Dataset, path: ContentPath) -> Dataset:
    item = root
    for index in path:
        item = item.ContentSequence[index]
    return item


def _one(paths: list[ContentPath], what: str) -> ContentPath:
    if len(paths) != 1:
        raise ValueError(f"the template report has {len(paths)} {what} items, expected 1")
    return paths[0]


@dataclass(frozen=True)
class ReportTemplate:
    """An encoded report and where in it the per-source values go."""

    encoded: bytes
    source_references: tuple[ContentPath, ...]  # items whose Referenced SOP is the source image
    frame_references: tuple[ContentPath, ...]  # UIDREF items holding its Frame of Reference UID
    tracking: ContentPath  # the UIDREF item of the Tracking Unique Identifier
    measurement: ContentPath  # the NUM item that `fill` replaces
    evaluation: ContentPath  # the CODE item that `fill` replaces

    @classmethod
    def from_report(
        cls,
        report: Dataset,
        source: Dataset,
        *,
        tracking_uid: str,
        measurement: Code,
        evaluation: Code,
    ) -> ReportTemplate:
        """Learn where `report`, built for `source`, holds the values that differ per source."""
        encoded = encode(report)
        items = list(_walk(dcmread(DicomBytesIO(encoded)).ContentSequence))
        frame = source.get("FrameOfReferenceUID")

        def references(item: Dataset) -> bool:
            refs = item.get("ReferencedSOPSequence")
            return bool(refs) and refs[0].ReferencedSOPInstanceUID == source.SOPInstanceUID

        kind = {p: item.get("ValueType") for p, item in items}
        return cls(
            encoded=encoded,
            source_references=tuple(p for p, item in items if references(item)),
            frame_references=tuple(
                p for p, item in items if frame and kind[p] == "UIDREF" and frame == item.UID
            ),
            tracking=_one(
                [p for p, item in items if kind[p] == "UIDREF" and tracking_uid == item.UID],
                "tracking UID",
            ),
            measurement=_one(
                [p for p, item in items if kind[p] == "NUM" and _named(item, measurement)],
                "measurement",
            ),
            evaluation=_one(
                [p for p, item in items if kind[p] == "CODE" and _named(item, evaluation)],
                "evaluation",
            ),
        )

    def fill(
        self,
        source: Dataset,
        *,
        sop_instance_uid: str,
        series_instance_uid: str,
        series_number: int,
        instance_number: int,
        tracking_uid: str,
        measurement: Dataset,
        evaluation: Dataset,
    ) -> Dataset:
        """The report of `source` (a checked header, see `ai.results.attributes`)."""
        sr = dcmread(DicomBytesIO(self.encoded))
        _set_identity(sr, sop_instance_uid, series_instance_uid, series_number, instance_number)
        _set_dates(sr, source)
        for keyword in (*PATIENT_STUDY, *CLINICAL_TRIAL_SUBJECT):
            if keyword in sr:
                del sr[keyword]
        sr.StudyInstanceUID = source.StudyInstanceUID
        copy_patient_and_study(sr, source)
        _set_evidence(sr, source)
        for path in self.source_references:
            _at(sr, path).ReferencedSOPSequence[0].ReferencedSOPInstanceUID = source.SOPInstanceUID
        for path in self.frame_references:
            _at(sr, path).UID = source.FrameOfReferenceUID
        _at(sr, self.tracking).UID = tracking_uid
        for path, item in ((self.measurement, measurement), (self.evaluation, evaluation)):
            _at(sr, path[:-1]).ContentSequence[path[-1]] = item
        return sr


def _set_identity(
    sr: Dataset, sop_instance_uid: str, series_instance_uid: str, series: int, instance: int
) -> None:
    sr.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    sr.SOPInstanceUID = sop_instance_uid
    sr.SeriesInstanceUID = series_instance_uid
    sr.SeriesNumber = series
    sr.InstanceNumber = instance


def _set_dates(sr: Dataset, source: Dataset) -> None:
    """Creation and content time now, as highdicom sets them; contributions as it dates them."""
    now = datetime.datetime.now()
    sr.InstanceCreationDate = DA(now.date())
    sr.InstanceCreationTime = TM(now.time())
    if "ContentDate" in sr:
        sr.ContentDate = DA(now.date())
        sr.ContentTime = TM(now.time())
    for item in sr.get("ContributingEquipmentSequence", []):
        purpose = item.PurposeOfReferenceCodeSequence[0].CodeValue
        if purpose == _PROCESSING_EQUIPMENT:
            item.ContributionDateTime = DT(now)
        elif purpose == _ACQUISITION_EQUIPMENT and "AcquisitionDateTime" in source:
            item.ContributionDateTime = DT(source.AcquisitionDateTime)


def _set_evidence(sr: Dataset, source: Dataset) -> None:
    study = sr.CurrentRequestedProcedureEvidenceSequence[0]
    study.StudyInstanceUID = source.StudyInstanceUID
    series = study.ReferencedSeriesSequence[0]
    series.SeriesInstanceUID = source.SeriesInstanceUID
    series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID = source.SOPInstanceUID


class TemplateCache:
    """The templates of the last `size` kinds of report, most recently used kept."""

    def __init__(self, size: int = 32) -> None:
        self.size = size
        self._templates: OrderedDict[Hashable, ReportTemplate] = OrderedDict()

    def get(self, key: Hashable, make: Callable[[], ReportTemplate]) -> ReportTemplate:
        template = self._templates.get(key)
        if template is None:
            template = make()
            self._templates[key] = template
            while len(self._templates) > self.size:
                self._templates.popitem(last=False)
        else:
            self._templates.move_to_end(key)
        return template

    def clear(self) -> None:
        self._templates.clear()
