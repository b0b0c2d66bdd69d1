"""The file meta group the node writes before a received dataset (storage.file_meta): the
same bytes pynetdicom's `Event.encoded_dataset` writes, read back by pydicom."""

from __future__ import annotations

import io

import pytest
from pydicom import dcmread
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from storage.file_meta import PREAMBLE, decode_file_meta_group, encode_file_meta_group

CASES = [
    # (SOP class, SOP instance, transfer syntax): UIDs of odd and even length, long and short
    ("1.2.840.10008.5.1.4.1.1.7", "1.2.3", JPEGBaseline8Bit),
    ("1.2.840.10008.5.1.4.1.1.1.1", "1.2.34", ImplicitVRLittleEndian),
    ("1.2.840.10008.5.1.4.1.1.88.33", "9" * 64, ExplicitVRBigEndian),
    ("1.2.840.10008.5.1.4.1.1.2", str(generate_uid()), "1.2.840.10008.1.2.4.201"),
    ("1.2", "1.2.3.4.5.6.7.8.9.10.11.12.13.14.15.16.17.18.19.20.21.22.23.24.25.26.2", "1.2.840"),
]


@pytest.mark.parametrize(("sop_class", "sop_instance", "syntax"), CASES)
def test_the_group_is_what_pynetdicom_writes(sop_class: str, sop_instance: str, syntax: str):
    expected = encode_file_meta(
        create_file_meta(
            sop_class_uid=UID(sop_class),
            sop_instance_uid=UID(sop_instance),
            transfer_syntax=UID(syntax),
        )
    )
    assert encode_file_meta_group(sop_class, sop_instance, syntax) == expected


@pytest.mark.parametrize(("sop_class", "sop_instance", "syntax"), CASES)
def test_the_group_reads_back_as_the_values_given(sop_class: str, sop_instance: str, syntax: str):
    group = encode_file_meta_group(sop_class, sop_instance, syntax)
    meta = decode_file_meta_group(group)
    assert meta.MediaStorageSOPClassUID == sop_class
    assert meta.MediaStorageSOPInstanceUID == sop_instance
    assert meta.TransferSyntaxUID == syntax
    assert meta.FileMetaInformationGroupLength == len(group) - 12
    # and pydicom reads a file made with it as a file, with the same meta
    read = dcmread(io.BytesIO(PREAMBLE + group), stop_before_pixels=True).file_meta
    assert read == meta


def test_a_uid_that_is_not_ascii_is_refused_not_mangled():
    with pytest.raises(UnicodeEncodeError):
        encode_file_meta_group("1.2.ü", "1.2.3", ImplicitVRLittleEndian)
