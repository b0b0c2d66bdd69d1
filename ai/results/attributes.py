"""The source's attributes as the result objects copy them: element by element, with the
source's VR and multiplicity, and only values that are valid for that VR.

A result must be a valid object whatever its source holds: a single-valued DS where others
send two, a Type 2 attribute that is missing, an empty sequence, a date in the wrong format.
A Type 2 attribute that is missing or invalid is sent empty, an invalid Type 3 one is left
out, and the log names the attribute but never its value (it may identify the patient).
"""

import copy
import logging

from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VM, dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import validate_value

logger = logging.getLogger(__name__)

# Root attributes of the Patient, General Study and Patient Study modules (PS3.3 C.7.1.1,
# C.7.2.1, C.7.2.2) with their types: what highdicom copies from the evidence of an SR, and
# what keeps a result in its source's patient and study.
PATIENT_STUDY: dict[str, str] = {
    "PatientName": "2",
    "PatientID": "2",
    "IssuerOfPatientID": "3",
    "TypeOfPatientID": "3",
    "IssuerOfPatientIDQualifiersSequence": "3",
    "PatientBirthDate": "2",
    "PatientBirthTime": "3",
    "PatientSex": "2",
    "QualityControlSubject": "3",
    "OtherPatientNames": "3",
    "OtherPatientIDsSequence": "3",
    "EthnicGroupCodeSequence": "3",
    "PatientSpeciesDescription": "1C",
    "PatientSpeciesCodeSequence": "1C",
    "PatientBreedDescription": "2C",
    "PatientBreedCodeSequence": "2C",
    "BreedRegistrationSequence": "2C",
    "ResponsiblePerson": "2C",
    "ResponsiblePersonRole": "1C",
    "ResponsibleOrganization": "2C",
    "PatientComments": "3",
    "PatientIdentityRemoved": "3",
    "DeidentificationMethod": "1C",
    "DeidentificationMethodCodeSequence": "1C",
    "StudyDate": "2",
    "StudyTime": "2",
    "AccessionNumber": "2",
    "IssuerOfAccessionNumberSequence": "3",
    "ReferringPhysicianName": "2",
    "ConsultingPhysicianName": "3",
    "StudyDescription": "3",
    "ProcedureCodeSequence": "3",
    "PhysiciansOfRecord": "3",
    "NameOfPhysiciansReadingStudy": "3",
    "ReferencedStudySequence": "3",
    "StudyID": "2",
    "RequestingService": "3",
    "AdmittingDiagnosesDescription": "3",
    "PatientAge": "3",
    "PatientSize": "3",
    "PatientWeight": "3",
    "PatientBodyMassIndex": "3",
    "MedicalAlerts": "3",
    "Allergies": "3",
    "Occupation": "3",
    "SmokingStatus": "3",
    "AdditionalPatientHistory": "3",
    "PregnancyStatus": "3",
    "PatientSexNeutered": "2C",
    "ReasonForVisit": "3",
    "AdmissionID": "3",
    "ServiceEpisodeID": "3",
    "ServiceEpisodeDescription": "3",
    "PatientState": "3",
}

# The Clinical Trial Subject module is copied whole or not at all: its Type 1 attributes
# cannot be made up when a source carries only part of it.
CLINICAL_TRIAL_SUBJECT: dict[str, str] = {
    "ClinicalTrialSponsorName": "1",
    "ClinicalTrialProtocolID": "1",
    "ClinicalTrialProtocolName": "2",
    "ClinicalTrialSiteID": "2",
    "ClinicalTrialSiteName": "2",
    "ClinicalTrialSubjectID": "1C",
    "ClinicalTrialSubjectReadingID": "1C",
}

# The acquisition equipment highdicom's ContributingEquipment.for_image_acquisition reads
# from a source (besides its SOP Class UID): the device, then when it acquired the image.
DEVICE = (
    "Manufacturer",
    "ManufacturerModelName",
    "SoftwareVersions",
    "DeviceSerialNumber",
    "InstitutionName",
    "InstitutionalDepartmentName",
    "InstitutionAddress",
    "StationName",
)
EQUIPMENT = (*DEVICE, "AcquisitionDateTime", "AcquisitionDate", "AcquisitionTime")

# What the builders read besides the patient and study: the image's geometry and history,
# and the acquisition equipment that highdicom lists as contributing equipment.
IMAGE_AND_EQUIPMENT = (
    "Modality",
    "Rows",
    "Columns",
    "FrameOfReferenceUID",
    "PatientOrientation",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "BodyPartExamined",
    "Laterality",
    "ImageLaterality",
    "LossyImageCompression",
    "LossyImageCompressionRatio",
    "LossyImageCompressionMethod",
    "InstanceNumber",
    *EQUIPMENT,
)
IDENTITY = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")

ENUMERATED: dict[str, tuple[str, ...]] = {
    "PatientSex": ("M", "F", "O"),
    "PatientIdentityRemoved": ("YES", "NO"),
    "QualityControlSubject": ("YES", "NO"),
    "Laterality": ("R", "L"),
    "LossyImageCompression": ("00", "01"),
}
DEIDENTIFICATION_UNSTATED = "Not stated in the source image"
_CHECKED = "_pneumonode_checked_header"  # marks a Dataset that source_header made

# VRs whose values pydicom has already decoded into numbers or bytes: nothing to check.
_BINARY_VRS = frozenset(
    {"AT", "FD", "FL", "OB", "OD", "OF", "OL", "OV", "OW", "SL", "SS", "SV", "UL", "UN", "US", "UV"}
)


def values_of(dataset: Dataset, keyword: str) -> list:
    """The values of an attribute as a list: [] when absent or empty, one item when it has
    a single value (a DSfloat is not a list), every item of a multi-valued one."""
    element = dataset.get(keyword)
    if element is None or element == "":
        return []
    if isinstance(element, (MultiValue, list, tuple)):
        return [v for v in element if v is not None and v != ""]
    return [element]


def _vm_allows(spec: str, count: int) -> bool:
    """Whether `count` values fit a dictionary VM such as '1', '2', '1-n', '2-2n'."""
    if count == 0:
        return True
    low, _, high = spec.partition("-")
    try:
        minimum = int(low)
    except ValueError:
        return True
    if not high:
        return count == minimum
    if high == "n":
        return count >= minimum
    if high.endswith("n"):
        step = int(high[:-1] or 1)
        return count >= minimum and count % step == 0
    return minimum <= count <= int(high)


def is_valid_element(element: DataElement, keyword: str) -> bool:
    """Whether the element may be written as it is: the dictionary's VR, a multiplicity the
    dictionary allows, each value valid for the VR, and an enumerated value where one is due."""
    expected_vr = dictionary_VR(element.tag)
    if " or " not in expected_vr and expected_vr != element.VR:
        return False
    if element.VR == "SQ" or element.VR in _BINARY_VRS:
        return True
    value = element.value
    values = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    values = [v for v in values if v is not None]
    if not _vm_allows(dictionary_VM(element.tag), len([v for v in values if v != ""])):
        return False
    for item in values:
        try:
            validate_value(element.VR, str(item), pydicom_config.RAISE)
        except (ValueError, TypeError):
            return False
    allowed = ENUMERATED.get(keyword)
    return allowed is None or all(str(v) in allowed for v in values if v != "")


def _empty(keyword: str) -> DataElement:
    tag = tag_for_keyword(keyword)
    vr = dictionary_VR(tag)
    return DataElement(tag, vr, [] if vr == "SQ" else None)


def copy_element(source: Dataset, keyword: str) -> DataElement | None:
    """A deep copy of the source's element if it is valid; None if absent or invalid."""
    if keyword not in source:
        return None
    try:
        element = source[keyword]
        valid = is_valid_element(element, keyword)
    except (ValueError, TypeError, KeyError):  # a raw value pydicom cannot even convert
        valid = False
    if not valid:
        logger.debug(
            "source %s: %s is not valid for its VR %s; not copied into the results",
            source.get("SOPInstanceUID", "?"),
            keyword,
            dictionary_VR(tag_for_keyword(keyword)),
        )
        return None
    return copy.deepcopy(element)


def _is_empty(element: DataElement) -> bool:
    return (
        element.value is None
        or element.value == ""
        or (element.VR == "SQ" and len(element.value) == 0)
    )


def copy_by_type(target: Dataset, source: Dataset, types: dict[str, str]) -> None:
    """Copy the attributes named in `types` from `source` into `target`: a Type 2 one that is
    missing or invalid becomes empty; an empty Type 3 one (a sequence of no items, which its
    module may forbid) says nothing and is left out; any other is copied when valid."""
    for keyword, kind in types.items():
        element = copy_element(source, keyword)
        if element is not None and not (kind == "3" and _is_empty(element)):
            target.add(element)
        elif kind == "2":
            target.add(_empty(keyword))


def _clinical_trial_subject(header: Dataset, source: Dataset) -> None:
    copied = Dataset()
    copy_by_type(copied, source, CLINICAL_TRIAL_SUBJECT)
    complete = all(
        values_of(copied, k) for k in ("ClinicalTrialSponsorName", "ClinicalTrialProtocolID")
    )
    identified = any(
        values_of(copied, k) for k in ("ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID")
    )
    if complete and identified:
        for element in copied:
            header.add(element)


def _deidentification(header: Dataset) -> None:
    """PatientIdentityRemoved YES requires a method (Type 1C); a source that states none keeps
    its YES, with a method text that says so rather than one made up."""
    if values_of(header, "PatientIdentityRemoved") != ["YES"]:
        return
    if values_of(header, "DeidentificationMethod") or header.get(
        "DeidentificationMethodCodeSequence"
    ):
        return
    header.DeidentificationMethod = DEIDENTIFICATION_UNSTATED


def source_header(source: Dataset) -> Dataset:
    """The part of `source` the result builders use, every attribute checked as above.

    The builders (and highdicom under them) read this header instead of the source, so an
    invalid or missing value in the source cannot make a result invalid or unbuildable.
    A header made here is returned as it is, so the SC and the SR can share one.
    """
    if getattr(source, _CHECKED, False):
        return source
    header = Dataset()
    for keyword in IDENTITY:
        if keyword in source:
            header.add(copy.deepcopy(source[keyword]))
    element = source.get((0x0008, 0x0005))  # Specific Character Set: as the source says
    if element is not None:
        header.add(copy.deepcopy(element))
    copy_by_type(header, source, PATIENT_STUDY)
    _clinical_trial_subject(header, source)
    _deidentification(header)
    copy_by_type(header, source, dict.fromkeys(IMAGE_AND_EQUIPMENT, "3"))
    setattr(header, _CHECKED, True)
    return header


def copy_patient_and_study(target: Dataset, header: Dataset) -> None:
    """Put the header's patient and study attributes into a result, replacing what highdicom
    wrote from them (it may convert a value, e.g. a date, into another form)."""
    for keyword in (*PATIENT_STUDY, *CLINICAL_TRIAL_SUBJECT):
        if keyword in header:
            target.add(copy.deepcopy(header[keyword]))
