"""What the tests share beyond `node.testing` (the harness that runs a real node, dcmtk and
Orthanc, also used by bench/): skipping when the SIIM sample is missing, and the
tolerances and checks the tests assert with.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import Dataset

from node.testing.samples import siim_dir, siim_missing_reason
from node.testing.samples import siim_files as sample_files

REPO_ROOT = Path(__file__).resolve().parents[1]

# How far a probability may move between two runs of the same model on the same image in
# different processes: the worker and `predict` batch images differently and run with
# different thread counts, and float32 convolutions then differ in the last bits (the 7th
# significant digit on some CPUs). PyTorch promises no bit-equality across batch sizes,
# thread counts or CPUs, so results are compared to this, not to the bit.
PROBABILITY_TOLERANCE = 1e-5


def assert_same_patient_and_study(written: Dataset, source: Dataset) -> None:
    """A result object must file under the source's patient and study."""
    for keyword in (
        "PatientID",
        "PatientName",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
    ):
        assert written.get(keyword) == source.get(keyword), keyword


def require_siim() -> Path:
    """The SIIM folder; skips the calling test (or fixture's users) when there is none."""
    reason = siim_missing_reason()
    if reason is not None:
        pytest.skip(reason)
    return siim_dir()


def siim_files() -> list[Path]:
    """Every SIIM DICOM file, sorted; skips the calling test when the sample is missing."""
    return sample_files(require_siim())


def siim_file(relative: str) -> Path:
    """One SIIM file by its path under the sample folder; skips when it is missing."""
    path = require_siim() / relative
    if not path.is_file():
        pytest.skip(f"{path} is not in the SIIM sample")
    return path
