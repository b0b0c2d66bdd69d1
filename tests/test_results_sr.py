"""The finding's Structured Report: valid for dciodvfy and dcmtk's SR parser, coded as the
issue asks, in the source's patient and study, and readable back by `read_finding`."""

import dataclasses
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ComprehensiveSRStorage, generate_uid
from support import assert_same_patient_and_study, siim_file

from ai.results.sr.sop import Finding, build_finding_sr, read_finding

pytestmark = pytest.mark.filterwarnings("ignore:The string .* person name:UserWarning")

CASES = [  # (file, probability, present)
    ("train/Pneumothorax/000153.dcm", 0.91, True),
    ("train/No Pneumothorax/000000.dcm", 0.12, False),
]
# Warnings that come from the SIIM source's own (copied) values: empty Study ID, and a
# Patient's Name that is a UUID in a single component (PN's retired form).
EXPLAINED_WARNINGS = ("needed to build DICOMDIR - Study ID", "Patient's Name")
DEVICE_UID = "1.2.826.0.1.3680043.8.498.1"


def read_source(relative: str) -> pydicom.Dataset:
    return pydicom.dcmread(siim_file(relative), stop_before_pixels=True)


def build(source: pydicom.Dataset, **overrides) -> pydicom.Dataset:
    arguments = dict(
        probability=0.91,
        present=True,
        threshold=0.5,
        algorithm_name="pneumonode xresnet50",
        algorithm_version="2024.1",
        device_observer_name="pneumonode",
        device_observer_uid=DEVICE_UID,
        device_observer_manufacturer="pneumonode project",
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        series_number=9002,
        instance_number=1,
        software_version="0.1.0",
    )
    arguments.update(overrides)
    return build_finding_sr(source, **arguments)


def run(program: str, *arguments: str) -> subprocess.CompletedProcess:
    if shutil.which(program) is None:
        pytest.skip(f"{program} is not installed")
    return subprocess.run([program, *arguments], capture_output=True, text=True, timeout=60)


def content_items(dataset: pydicom.Dataset):
    for item in dataset.get("ContentSequence", []):
        yield item
        yield from content_items(item)


def coded(sequence) -> tuple[str, str]:
    return sequence[0].CodeValue, sequence[0].CodingSchemeDesignator


def find_items(sr: pydicom.Dataset, value_type: str, name: tuple[str, str]) -> list:
    return [
        item
        for item in content_items(sr)
        if item.ValueType == value_type and coded(item.ConceptNameCodeSequence) == name
    ]


@pytest.mark.parametrize(("relative", "probability", "present"), CASES)
def test_sr_is_valid_and_carries_the_coded_finding(
    relative: str, probability: float, present: bool, tmp_path: Path
) -> None:
    source = read_source(relative)
    series_uid, sop_uid = generate_uid(), generate_uid()
    sr = build(
        source,
        probability=probability,
        present=present,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
    )
    path = tmp_path / "sr.dcm"
    pydicom.dcmwrite(path, sr, enforce_file_format=True)

    result = run("dciodvfy", str(path))
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert not [line for line in lines if "Error" in line], "\n".join(lines)
    unexplained = [
        line
        for line in lines
        if line.startswith("Warning") and not any(e in line for e in EXPLAINED_WARNINGS)
    ]
    assert not unexplained, "\n".join(unexplained)
    dump = run("dsrdump", str(path))  # dcmtk parses and checks the content tree
    assert dump.returncode == 0 and not dump.stderr.strip(), dump.stderr

    written = pydicom.dcmread(path)
    assert written.SOPClassUID == ComprehensiveSRStorage
    assert (written.SOPInstanceUID, written.SeriesInstanceUID) == (sop_uid, series_uid)
    assert written.SeriesInstanceUID != source.SeriesInstanceUID
    assert written.Modality == "SR"
    assert_same_patient_and_study(written, source)
    assert (written.CompletionFlag, written.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    evidence = written.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    referenced = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID

    # TID 1500 root, the measurement group, and its content.
    assert coded(written.ConceptNameCodeSequence) == ("126000", "DCM")
    assert written.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    (group,) = find_items(written, "CONTAINER", ("125007", "DCM"))
    (finding_type,) = find_items(group, "CODE", ("121071", "DCM"))
    assert coded(finding_type.ConceptCodeSequence) == ("36118008", "SCT")
    (presence,) = find_items(group, "CODE", ("36118008", "SCT"))
    expected_presence = ("52101004", "SCT") if present else ("272519000", "SCT")
    assert coded(presence.ConceptCodeSequence) == expected_presence
    (measurement,) = find_items(group, "NUM", ("122157", "DCM"))
    value = measurement.MeasuredValueSequence[0]
    assert float(value.NumericValue) == pytest.approx(probability)
    assert coded(value.MeasurementUnitsCodeSequence) == ("1", "UCUM")
    (image,) = find_items(group, "IMAGE", ("121112", "DCM"))
    reference = image.ReferencedSOPSequence[0]
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert reference.ReferencedSOPClassUID == source.SOPClassUID
    assert "ReferencedFrameNumber" not in reference  # the whole image
    (algorithm,) = find_items(group, "TEXT", ("111001", "DCM"))
    assert algorithm.TextValue == "pneumonode xresnet50"
    (observer_type,) = find_items(written, "CODE", ("121005", "DCM"))
    assert coded(observer_type.ConceptCodeSequence) == ("121007", "DCM")
    (device_uid,) = find_items(written, "UIDREF", ("121012", "DCM"))
    assert device_uid.UID == DEVICE_UID

    # Presence before any number: the group's first coded statement cannot read as positive.
    order = [item.ValueType for item in group.ContentSequence]
    assert order.index("CODE", order.index("CODE") + 1) < order.index("NUM")
    (family,) = find_items(group, "CODE", ("111000", "DCM"))
    assert coded(family.ConceptCodeSequence) == ("123110", "DCM")

    finding = read_finding(written)
    assert finding.algorithm_family == "Artificial Intelligence"
    assert finding.tracking_uid and finding.regions == ()
    assert dataclasses.replace(finding, tracking_uid="", algorithm_family="") == Finding(
        probability=probability,
        present=present,
        threshold=0.5,
        referenced_sop_instance_uid=source.SOPInstanceUID,
        referenced_sop_class_uid=source.SOPClassUID,
        algorithm_name="pneumonode xresnet50",
        algorithm_version="2024.1",
        device_observer_uid=DEVICE_UID,
    )


def test_sr_leaves_out_a_malformed_patient_age_from_the_source() -> None:
    source = read_source(CASES[0][0])
    assert source.PatientAge == "23"  # SIIM's value is not a valid AS ("023Y")
    assert "PatientAge" not in build(source)
    source = pydicom.Dataset(source)
    source.PatientAge = "023Y"
    assert build(source).PatientAge == "023Y"


@pytest.mark.parametrize(
    ("change", "argument"),
    [
        ({"probability": 1.5}, "probability"),
        ({"probability": -0.1}, "probability"),
        ({"probability": float("nan")}, "probability"),
        ({"probability": True}, "probability"),
        ({"threshold": 2.0}, "threshold"),
        ({"algorithm_name": ""}, "algorithm_name"),
        ({"algorithm_version": "  "}, "algorithm_version"),
        ({"device_observer_uid": "node-1"}, "device_observer_uid"),
        ({"device_observer_name": ""}, "device_observer_name"),
        ({"series_instance_uid": "1.2.x"}, "series_instance_uid"),
        ({"instance_number": -1}, "instance_number"),
        ({"present": False}, "present"),  # contradicts 0.91 >= 0.5
        ({"present": "yes"}, "present"),
    ],
)
def test_sr_rejects_invalid_inputs(change: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        build(read_source(CASES[0][0]), **change)


def test_sr_refuses_a_source_without_identity() -> None:
    source = read_source(CASES[0][0])
    source = pydicom.Dataset(source)
    del source.SOPInstanceUID
    with pytest.raises(ValueError, match="source"):
        build(source)


def test_read_finding_refuses_what_is_not_a_measurement_report() -> None:
    with pytest.raises(ValueError, match="sr is not a TID 1500 Measurement Report"):
        read_finding(read_source(CASES[0][0]))


@pytest.mark.parametrize("modality", ["CR", "DX"])
def test_sr_image_library_gives_the_sources_own_modality(modality: str) -> None:
    # SIIM's chest X-rays are Secondary Capture objects with Modality CR: the SOP class alone
    # would make the image library say OT.
    source = pydicom.Dataset(read_source(CASES[0][0]))
    assert source.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    source.Modality = modality
    (library,) = find_items(build(source), "CONTAINER", ("111028", "DCM"))
    (entry_modality,) = find_items(library, "CODE", ("121139", "DCM"))
    assert coded(entry_modality.ConceptCodeSequence) == (modality, "DCM")
    assert source.Modality == modality  # the source is not changed
