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
from pynetdicom import build_context, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from node.dicom.storage_scp import received_file
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


def _store_event(sop_class: str, sop_instance: str, syntax: str) -> evt.Event:
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = sop_class
    request.AffectedSOPInstanceUID = sop_instance
    request.DataSet = io.BytesIO(b"\x08\x00\x16\x00\x04\x00\x00\x001.2\x00")
    context = build_context(sop_class, syntax)
    context.context_id = 1
    context._as_scp = True
    context.result = 0x00
    return evt.Event(None, evt.EVT_C_STORE, {"request": request, "context": context.as_tuple})


# pynetdicom refuses a request whose UID is longer than 64 characters (the last case).
@pytest.mark.parametrize(("sop_class", "sop_instance", "syntax"), CASES[:-1])
def test_a_received_dataset_becomes_the_file_pynetdicom_makes(sop_class, sop_instance, syntax):
    event = _store_event(sop_class, sop_instance, syntax)
    data, (meta, dataset_start) = received_file(event)
    assert data == event.encoded_dataset()
    assert data[dataset_start:] == event.request.DataSet.getvalue()
    assert meta == dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta
    assert meta.MediaStorageSOPInstanceUID == event.file_meta.MediaStorageSOPInstanceUID


def test_a_request_without_its_uids_is_left_to_pynetdicom():
    event = _store_event("1.2.840.10008.5.1.4.1.1.7", "1.2.3", ImplicitVRLittleEndian)
    event.request.AffectedSOPInstanceUID = None
    with pytest.raises(AttributeError):  # pynetdicom's own refusal, as before
        received_file(event)
