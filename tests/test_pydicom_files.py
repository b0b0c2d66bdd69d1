"""Every image of pydicom's own test files that pydicom can decode is accepted: sent with
fresh UIDs in its own transfer syntax (dcmtk's storescu where it has a flag for that syntax,
pynetdicom otherwise), stored, and read back equal; `pneumonode import` of the same files
gives the same result. pydicom's deliberately broken files are refused, each for its reason.
"""

from __future__ import annotations

import subprocess
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest
from dicom_data import association, chunked_sending
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_files
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)
from sqlalchemy import select

from node.dicom.storage_classes import STORAGE_SOP_CLASSES as NODE_STORAGE_SOP_CLASSES
from node.testing.dcmtk import DCMTK_ENV, dcmtk
from node.testing.index import index_connection
from node.testing.node_process import NodeProcess, node_command, node_env
from storage.models import Instance

# storescu's option that proposes each transfer syntax (with -R: only what the files need).
STORESCU_FLAGS = {
    ExplicitVRLittleEndian: "-xe",
    ImplicitVRLittleEndian: "-xi",
    ExplicitVRBigEndian: "-xb",
    DeflatedExplicitVRLittleEndian: "-xd",
    JPEGBaseline8Bit: "-xy",
    JPEGExtended12Bit: "-xx",
    JPEGLosslessSV1: "-xs",
    JPEG2000Lossless: "-xv",
    JPEG2000: "-xw",
    JPEGLSLossless: "-xt",
    JPEGLSNearLossless: "-xu",
    RLELossless: "-xr",
}
# pynetdicom's storage classes and the retired ones the node adds: pydicom's downloadable
# color-pl.dcm and color-px.dcm (in its data cache once fetched) are retired Ultrasound Image
# Storage, as old modalities still send. tests/test_storage_classes.py covers that class
# where the cache is empty.
STORAGE_SOP_CLASSES = frozenset(NODE_STORAGE_SOP_CLASSES)

# pydicom's test files that are broken on purpose, and the reason the node gives for each.
BROKEN_ON_PURPOSE = {
    "MR_truncated.dcm": "cannot parse",
    "rtplan_truncated.dcm": "cannot parse",
    "SC_rgb_jpeg.dcm": "encoded Implicit VR",  # its meta says JPEG Baseline (Explicit VR)
    "meta_missing_tsyntax.dcm": "unknown transfer syntax",
    "badVR.dcm": "NumberOfFrames",
}


@dataclass(frozen=True)
class Sample:
    name: str
    path: Path
    transfer_syntax: UID
    sop_instance_uid: str


def _decodable_images() -> list[Path]:
    """pydicom's test files with pixel data that pydicom decodes, of a storage SOP class."""
    chosen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in sorted(get_testdata_files("*.dcm")):
            path = Path(name)
            try:
                ds = dcmread(path)
                ds.pixel_array  # noqa: B018 - decoding is the point
            except Exception:
                continue
            if str(ds.get("SOPClassUID", "")) in STORAGE_SOP_CLASSES:
                chosen.append(path)
    return chosen


def _fresh_copy(source: Path, folder: Path) -> Sample | None:
    """The file with new Study/Series/SOP UIDs, in its own transfer syntax; None if pydicom
    cannot write it back (SC_rgb_jpeg.dcm, whose meta lies about its encoding)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(source)
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        target = folder / source.name
        try:
            ds.save_as(target, enforce_file_format=True)
        except Exception:
            target.unlink(missing_ok=True)
            return None
    return Sample(source.name, target, UID(ds.file_meta.TransferSyntaxUID), str(ds.SOPInstanceUID))


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> list[Sample]:
    folder = tmp_path_factory.mktemp("pydicom_copies")
    made = [_fresh_copy(path, folder) for path in _decodable_images()]
    assert len(made) >= 55, "pydicom ships fewer decodable test images than expected"
    return [sample for sample in made if sample is not None]


def _send(node: NodeProcess, samples: list[Sample]) -> dict[str, str]:
    """Send each sample in its own transfer syntax; returns how each one was sent."""
    by_flag: dict[str, list[Sample]] = defaultdict(list)
    others = []
    for sample in samples:
        flag = STORESCU_FLAGS.get(sample.transfer_syntax)
        (by_flag[flag].append(sample) if flag else others.append(sample))
    how = {}
    for flag, group in by_flag.items():
        result = subprocess.run(
            [dcmtk("storescu"), "-R", flag, "-aec", node.ae_title, node.host, str(node.port)]
            + [str(s.path) for s in group],
            env=DCMTK_ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        how.update({s.name: f"storescu {flag}" for s in group})
    for sample in others:
        ds = dcmread(sample.path, stop_before_pixels=True)
        contexts = [(str(ds.SOPClassUID), [sample.transfer_syntax])]
        with chunked_sending(), association(node.host, node.port, node.ae_title, contexts) as a:
            assert a.send_c_store(sample.path).Status == 0x0000, sample.name
        how[sample.name] = "pynetdicom"
    return how


def _indexed(db_url: str) -> dict[str, tuple[str, str]]:
    with index_connection(db_url) as conn:
        rows = conn.execute(
            select(Instance.sop_instance_uid, Instance.file_path, Instance.transfer_syntax_uid)
        )
        return {sop: (path, syntax) for sop, path, syntax in rows}


def _differences(sent: Dataset, kept: Dataset, path: str = "") -> list[str]:
    """Elements whose value (or VR) differ, recursively. dcmtk normalises two things when
    it sends, which are the sender's doing and allowed: the VR of encapsulated Pixel Data
    becomes OB (PS3.5 A.4), and Data Set Trailing Padding (FFFC,FFFC) is dropped."""
    found = []
    for element in sent:
        where = f"{path}{element.tag}"
        if element.tag == 0xFFFCFFFC:
            continue
        if element.tag not in kept:
            found.append(f"{where} missing")
            continue
        other = kept[element.tag]
        if element.VR == "SQ":
            if len(element.value) != len(other.value):
                found.append(f"{where} item count")
            for i, (a, b) in enumerate(zip(element.value, other.value, strict=False)):
                found += _differences(a, b, f"{where}[{i}].")
        elif element.value != other.value:
            found.append(f"{where} value")
        elif element.VR != other.VR and not (element.tag == 0x7FE00010 and other.VR == "OB"):
            found.append(f"{where} VR {element.VR} -> {other.VR}")
    found += [f"{path}{e.tag} added" for e in kept if e.tag not in sent]
    return found


def _assert_reads_back_equal(sample: Sample, stored: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sent = dcmread(sample.path)
        kept = dcmread(stored)
    assert kept.file_meta.TransferSyntaxUID == sample.transfer_syntax, sample.name
    assert _differences(sent, kept) == [], sample.name
    pixel_keyword = next(
        k for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData") if k in sent
    )
    assert kept[pixel_keyword].value == sent[pixel_keyword].value, sample.name


def test_every_decodable_pydicom_image_is_stored_and_reads_back_equal(
    node_factory, samples: list[Sample]
) -> None:
    node = node_factory(name="pydicom_files")
    how = _send(node, samples)
    indexed = _indexed(node.db_url)
    missing = [s.name for s in samples if s.sop_instance_uid not in indexed]
    assert not missing, f"refused: {missing}\n{node.log_text()[-3000:]}"
    for sample in samples:
        path, syntax = indexed[sample.sop_instance_uid]
        assert syntax == sample.transfer_syntax, sample.name
        _assert_reads_back_equal(sample, node.storage / "files" / path)
    assert sum(h.startswith("storescu") for h in how.values()) >= 50
    assert "refused" not in node.log_text()


def _import(node: NodeProcess, folder: Path, status: int = 0) -> subprocess.CompletedProcess:
    """`pneumonode import` of `folder` into the (stopped) node's storage, which exits with
    `status` (1: something was refused)."""
    result = subprocess.run(
        node_command(node.config_path, "import", str(folder), "--no-progress", "--list-skipped"),
        env=node_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == status, result.stderr
    return result


def test_import_of_the_same_files_gives_the_same_result(
    node_factory, samples: list[Sample], tmp_path: Path
) -> None:
    node = node_factory(name="pydicom_import")
    assert node.stop() == 0
    folder = samples[0].path.parent
    result = _import(node, folder)
    assert f"stored: {len(samples)}" in result.stdout, result.stdout
    assert "skipped: 0" in result.stdout, result.stdout
    indexed = _indexed(node.db_url)
    for sample in samples:
        path, _syntax = indexed[sample.sop_instance_uid]
        stored = node.storage / "files" / path
        assert stored.read_bytes() == sample.path.read_bytes(), sample.name  # byte for byte


def test_import_refuses_pydicoms_broken_files_each_for_its_reason(node_factory) -> None:
    node = node_factory(name="pydicom_broken")
    assert node.stop() == 0
    folder = Path(get_testdata_files("MR_small.dcm")[0]).parent
    result = _import(node, folder, status=1)
    skipped = {
        Path(line.split(": ", 1)[0].removeprefix("skipped ")).name: line.split(": ", 1)[1]
        for line in result.stdout.splitlines()
        if line.startswith("skipped ") and ": " in line
    }
    for name, reason in BROKEN_ON_PURPOSE.items():
        assert name in skipped, f"{name} was not refused:\n{result.stdout}"
        assert reason in skipped[name], (name, skipped[name])
    stored = _indexed(node.db_url)
    assert len(stored) >= 55  # everything else that is an instance went in
