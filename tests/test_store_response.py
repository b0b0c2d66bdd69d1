"""C-STORE responses made in one go (node.dicom.store_response): the P-DATA pynetdicom's own
message class would send, byte for byte, and the same command set for whoever reads it."""

from __future__ import annotations

import pytest
from pydicom.uid import UID, generate_uid
from pynetdicom import dimse, dimse_messages
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from node.dicom import store_response
from node.dicom.store_response import C_STORE_RSP, encode_store_response


def response(message_id: int, sop_class: str, sop_instance: str, status: int, **more) -> C_STORE:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.AffectedSOPClassUID = UID(sop_class)
    primitive.AffectedSOPInstanceUID = UID(sop_instance)
    primitive.Status = status
    for name, value in more.items():
        setattr(primitive, name, value)
    return primitive


def sent(message_class: type, primitive: C_STORE, max_pdu: int) -> list[list[tuple[int, bytes]]]:
    message = message_class()
    message.primitive_to_message(primitive)
    return [p.presentation_data_value_list for p in message.encode_msg(5, max_pdu)]


PLAIN = [
    (1, "1.2.840.10008.5.1.4.1.1.7", "1.2.3", 0x0000),
    (65535, "1.2.840.10008.5.1.4.1.1.1.1", "1.2.34", 0xB000),
    (7, "1.2.840.10008.5.1.4.1.1.88.33", "9" * 64, 0xA700),
    (300, "1.2.840.10008.5.1.4.1.1.2", str(generate_uid()), 0xC211),
]


@pytest.mark.parametrize(("message_id", "sop_class", "sop_instance", "status"), PLAIN)
@pytest.mark.parametrize("max_pdu", [0, 16382, 262144])
def test_a_plain_response_is_what_pynetdicom_sends(
    message_id, sop_class, sop_instance, status, max_pdu
):
    primitive = response(message_id, sop_class, sop_instance, status)
    expected = sent(dimse_messages.C_STORE_RSP, primitive, max_pdu)
    assert sent(C_STORE_RSP, primitive, max_pdu) == expected
    # made in one go, not by pynetdicom's class
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    assert message._encoded == encode_store_response(message_id, sop_class, sop_instance, status)


@pytest.mark.parametrize(("message_id", "sop_class", "sop_instance", "status"), PLAIN)
def test_its_command_set_reads_as_pynetdicoms(message_id, sop_class, sop_instance, status):
    primitive = response(message_id, sop_class, sop_instance, status)
    theirs = dimse_messages.C_STORE_RSP()
    theirs.primitive_to_message(primitive)
    ours = C_STORE_RSP()
    ours.primitive_to_message(primitive)
    assert ours.command_set == theirs.command_set
    assert ours.command_set.Status == status
    assert ours.command_set.MessageIDBeingRespondedTo == message_id
    assert encode(ours.command_set, True, True) == encode(theirs.command_set, True, True)
    # what pynetdicom's reader makes of it: the same primitive back
    assert ours.message_to_primitive().Status == status


@pytest.mark.parametrize(
    "more",
    [
        {"ErrorComment": "cannot write the index"},
        {"OffendingElement": [0x0020000D]},
        {"ErrorComment": "study 1.2 of other patient", "OffendingElement": [0x0020000D]},
    ],
)
def test_a_response_with_more_is_made_by_pynetdicoms_class(more):
    primitive = response(3, "1.2.840.10008.5.1.4.1.1.7", "1.2.3.4", 0xC240, **more)
    ours = C_STORE_RSP()
    ours.primitive_to_message(primitive)
    assert ours._encoded is None
    assert sent(C_STORE_RSP, primitive, 16382) == sent(
        dimse_messages.C_STORE_RSP, primitive, 16382
    )


def test_a_command_set_longer_than_the_pdu_is_fragmented_as_pynetdicom_does():
    primitive = response(9, "1.2.840.10008.5.1.4.1.1.7", "1." + "2" * 62, 0)
    fragments = sent(C_STORE_RSP, primitive, 64)
    assert len(fragments) > 1
    assert fragments == sent(dimse_messages.C_STORE_RSP, primitive, 64)


def test_a_response_without_uids_is_made_by_pynetdicoms_class():
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 1
    primitive.Status = 0
    ours = C_STORE_RSP()
    ours.primitive_to_message(primitive)
    assert ours._encoded is None
    assert sent(C_STORE_RSP, primitive, 0) == sent(dimse_messages.C_STORE_RSP, primitive, 0)


def test_it_has_every_attribute_pynetdicoms_message_has():
    assert set(vars(dimse_messages.C_STORE_RSP())) <= set(vars(C_STORE_RSP()))
    assert type(C_STORE_RSP()).__name__ == "C_STORE_RSP"  # how pynetdicom and metrics tell it


def test_install_makes_pynetdicom_use_it(monkeypatch):
    monkeypatch.setitem(dimse._RSP_TO_MESSAGE, C_STORE, dimse_messages.C_STORE_RSP)
    store_response.install()
    assert dimse._RSP_TO_MESSAGE[C_STORE] is C_STORE_RSP
    store_response.install()  # idempotent
    assert dimse._RSP_TO_MESSAGE[C_STORE] is C_STORE_RSP
