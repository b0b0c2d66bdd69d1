"""A small archive for the retrieve tests, made from SIIM images, and the retrieve clients.

Two patients. The first has study 1 with a series of two JPEG Baseline images as SIIM
ships them and a series of the same pictures decompressed, one in Explicit and one in
Implicit VR Little Endian, and study 2 with one JPEG image: every level has something to
select and something to leave out. The second patient has one study of `BIG_STUDY_SIZE`
JPEG images, long enough to cancel a move half way. Each instance is sent in its own
transfer syntax (pynetdicom, one context per syntax), so the node stores it as it is here.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)
from pynetdicom import AE

from node.testing.dcmtk import DCMTK_ENV, dcmtk
from node.testing.node_process import NodeProcess
from storage.structure import file_meta_end

BIG_STUDY_SIZE = 30


def assert_converted_pixels(got: Dataset, source: Path) -> None:
    """A converted SIIM JPEG holds the values Pillow decodes (the node's decoder for
    greyscale JPEG), within 1 of pydicom's default decoder's, as conformant decoders of a
    lossy JPEG may differ (storage.conversion)."""
    original = dcmread(source)
    assert np.array_equal(got.pixel_array, pixel_array(original, decoding_plugin="pillow"))
    difference = got.pixel_array.astype(int) - original.pixel_array.astype(int)
    assert np.abs(difference).max() <= 1


def uid(*parts: object) -> str:
    """A UID fixed by its parts, so that every run builds the same archive."""
    return generate_uid(entropy_srcs=["pneumonode retrieve tests", *map(str, parts)])


@dataclass(frozen=True)
class Item:
    """One instance of the archive and where it sits."""

    patient_id: str
    study: str
    series: str
    sop: str
    syntax: str
    path: Path


def _instance(
    source: Path, patient_id: str, study: str, series: str, number: int, syntax: str
) -> Dataset:
    ds = dcmread(source)
    ds.PatientID = patient_id
    ds.PatientName = f"RETRIEVE^{patient_id[-1]}"
    ds.StudyInstanceUID = uid(study)
    ds.SeriesInstanceUID = uid(study, series)
    ds.SOPInstanceUID = uid(study, series, number)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesNumber = int(series[-1])
    ds.InstanceNumber = number
    if syntax != JPEGBaseline8Bit:
        ds.decompress(generate_instance_uid=False)
        ds.file_meta.TransferSyntaxUID = syntax
    return ds


def build_archive(siim: list[Path], folder: Path) -> list[Item]:
    """Write the archive's files into `folder`; returns them in the node's retrieve order."""
    folder.mkdir(parents=True, exist_ok=True)
    layout = [
        ("RETRIEVE-1", "study1", "series1", JPEGBaseline8Bit),
        ("RETRIEVE-1", "study1", "series1", JPEGBaseline8Bit),
        ("RETRIEVE-1", "study1", "series2", ExplicitVRLittleEndian),
        ("RETRIEVE-1", "study1", "series2", ImplicitVRLittleEndian),
        ("RETRIEVE-1", "study2", "series1", JPEGBaseline8Bit),
    ] + [("RETRIEVE-2", "study3", "series1", JPEGBaseline8Bit)] * BIG_STUDY_SIZE
    items = []
    numbers: dict[tuple[str, str], int] = {}
    for source, (patient_id, study, series, syntax) in zip(siim, layout, strict=False):
        number = numbers[(study, series)] = numbers.get((study, series), 0) + 1
        ds = _instance(source, patient_id, study, series, number, syntax)
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True)
        items.append(
            Item(
                patient_id,
                str(ds.StudyInstanceUID),
                str(ds.SeriesInstanceUID),
                str(ds.SOPInstanceUID),
                syntax,
                path,
            )  # fmt: skip
        )
    return items


def send_as_stored(node: NodeProcess, paths: list[Path]) -> None:
    """C-STORE each file in its own transfer syntax (pynetdicom, one context per syntax)."""
    headers = [dcmread(path, stop_before_pixels=True) for path in paths]
    ae = AE(ae_title="RETRIEVEDATA")
    for pair in sorted({(h.SOPClassUID, h.file_meta.TransferSyntaxUID) for h in headers}):
        ae.add_requested_context(pair[0], [pair[1]])
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        for path in paths:
            status = assoc.send_c_store(path)
            assert status.Status == 0x0000, f"{path.name}: 0x{status.Status:04X}"
    finally:
        assoc.release()


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a DICOM file, without preamble and file meta."""
    data = path.read_bytes()
    return data[file_meta_end(data) :]


def retrieve_keys(level: str, items: list[Item], root: str) -> list[str]:
    """`-k` keys selecting `items` at `level`: the unique keys above it and, at it, the
    value (a list of UIDs at IMAGE level)."""
    first = items[0]
    keys = [f"QueryRetrieveLevel={level}"]
    if root == "-P":
        keys.append(f"PatientID={first.patient_id}")
    if level in ("STUDY", "SERIES", "IMAGE"):
        keys.append(f"StudyInstanceUID={first.study}")
    if level in ("SERIES", "IMAGE"):
        keys.append(f"SeriesInstanceUID={first.series}")
    if level == "IMAGE":
        keys.append("SOPInstanceUID=" + "\\".join(item.sop for item in items))
    return keys


def run_scu(
    program: str, node: NodeProcess, root: str, keys: list[str], *extra: str
) -> subprocess.CompletedProcess:
    """dcmtk movescu or getscu (-v) against the node with `-k` keys."""
    args = [dcmtk(program), "-v", root, "-aet", program.upper(), "-aec", node.ae_title]
    for key in keys:
        args += ["-k", key]
    return subprocess.run(
        [*args, *extra, node.host, str(node.port)],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
