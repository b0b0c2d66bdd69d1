"""node/dicom/uid_validity.py answers UID.is_valid as pydicom does, from memory."""

from __future__ import annotations

import pytest
from pydicom.uid import UID, generate_uid

from node.dicom import uid_validity

SAMPLES = [
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.5.1.4.1.1.1",
    generate_uid(),
    "0",
    "0.0",
    "1.02.3",  # a component with a leading zero
    "1.2.",
    ".1.2",
    "1..2",
    "1.2.3a",
    "",
    " 1.2.3",
    "1.2.3 ",
    "1.2.3\0",
    "1." + "2" * 62,  # 64 characters
    "1." + "2" * 63,  # 65
    "١.٢",  # Arabic-Indic digits: not DICOM's
]


@pytest.mark.parametrize("value", SAMPLES)
def test_the_remembered_answer_is_pydicom_s(value: str) -> None:
    uid = UID(value, validation_mode=0)  # as pydicom makes it (it may strip spaces)
    expected = uid_validity._pydicom_is_valid.fget(uid)
    assert uid_validity.is_valid_uid(uid) is expected
    assert uid_validity.is_valid_uid(str(uid)) is expected


def test_installed_uid_is_valid_answers_as_before(monkeypatch) -> None:
    monkeypatch.setattr(UID, "is_valid", uid_validity._pydicom_is_valid)
    assert uid_validity.install()
    assert uid_validity.install()  # once is enough; twice changes nothing
    for value in SAMPLES:
        uid = UID(value, validation_mode=0)
        assert uid.is_valid is uid_validity._pydicom_is_valid.fget(uid)


def test_a_pydicom_that_checks_otherwise_keeps_its_own(monkeypatch) -> None:
    own = property(lambda self: True)
    monkeypatch.setattr(UID, "is_valid", own)
    monkeypatch.setattr(uid_validity, "_pydicom_is_valid", own)
    assert not uid_validity.install()
    assert UID.__dict__["is_valid"] is own


@pytest.mark.parametrize("enforce", [False, True])
def test_the_validator_answers_as_pynetdicom_s(enforce: bool, monkeypatch) -> None:
    from pynetdicom import _config

    monkeypatch.setattr(_config, "ENFORCE_UID_CONFORMANCE", enforce)
    for value in [*SAMPLES, *(UID(v, validation_mode=0) for v in SAMPLES), None, 12, b"1.2"]:
        expected = uid_validity._pynetdicom_validate_ui(value)
        assert uid_validity.validate_ui(value) == expected, value


def test_pynetdicom_checks_uids_with_it_once_installed(monkeypatch) -> None:
    from pynetdicom import _config

    monkeypatch.setitem(_config.VALIDATORS, "UI", uid_validity._pynetdicom_validate_ui)
    monkeypatch.setattr(UID, "is_valid", uid_validity._pydicom_is_valid)
    uid_validity.install()
    assert _config.VALIDATORS["UI"] is uid_validity.validate_ui
