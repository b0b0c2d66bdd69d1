"""Instances prepared ahead of the sending (node.dicom.send_instances.PreparedAhead, and
node.dicom.retrieve.sub_operations): in order, at most a few at a time, and dropped on C-CANCEL."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

import node.dicom.retrieve as retrieve_module
from node.dicom.retrieve import STATUS_CANCEL, STATUS_PENDING, Retrieve, sub_operations
from node.dicom.send_instances import PREPARE_AHEAD, Outgoing, PreparedAhead


def _rows(count: int) -> list[SimpleNamespace]:
    return [
        SimpleNamespace(
            sop_instance_uid=f"1.2.3.{n}",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
            transfer_syntax_uid="1.2.840.10008.1.2.4.50",
            file_path=f"{n}.dcm",
        )
        for n in range(count)
    ]


def test_outgoings_come_in_order_with_at_most_depth_prepared_ahead() -> None:
    rows = _rows(20)
    started: list[str] = []
    lock = threading.Lock()
    consumed = 0
    most_ahead = 0

    def prepare_one(row: SimpleNamespace) -> Outgoing:
        nonlocal most_ahead
        with lock:
            started.append(row.sop_instance_uid)
            most_ahead = max(most_ahead, len(started) - consumed)
        time.sleep(random.uniform(0, 0.003))  # finish out of order
        return Outgoing(row, syntax="1.2.840.10008.1.2")

    with ThreadPoolExecutor(max_workers=4) as pool:
        ahead = PreparedAhead(prepare_one, rows, depth=3, pool=pool)
        got = []
        for _ in rows:
            got.append(ahead.next().instance.sop_instance_uid)
            with lock:
                consumed += 1
        with pytest.raises(IndexError):
            ahead.next()

    assert got == [row.sop_instance_uid for row in rows]
    assert most_ahead <= 4  # the one taken and `depth` behind it


def test_drop_cancels_what_has_not_started() -> None:
    rows = _rows(10)
    release = threading.Event()
    second_started = threading.Event()
    prepared: list[str] = []

    def prepare_one(row: SimpleNamespace) -> Outgoing:
        prepared.append(row.sop_instance_uid)
        if row.sop_instance_uid != "1.2.3.0":
            second_started.set()
            release.wait(5)
        return Outgoing(row, syntax="1.2.840.10008.1.2")

    with ThreadPoolExecutor(max_workers=1) as pool:
        ahead = PreparedAhead(prepare_one, rows, depth=4, pool=pool)
        assert ahead.next().instance.sop_instance_uid == "1.2.3.0"
        assert second_started.wait(5)
        ahead.drop()
        release.set()
    # The one running when dropped finished; the rest never started.
    assert prepared == ["1.2.3.0", "1.2.3.1"]


def test_a_cancel_stops_the_sub_operations_and_the_preparing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rows = _rows(30)
    prepared: list[str] = []

    def fake_prepare(archive, row, accepted, receiver) -> Outgoing:
        prepared.append(row.sop_instance_uid)
        if row.sop_instance_uid == "1.2.3.1":
            return Outgoing(row, refusal="no context")
        return Outgoing(row, syntax=row.transfer_syntax_uid, stored_path=row.file_path)

    monkeypatch.setattr(retrieve_module, "prepare", fake_prepare)
    monkeypatch.setattr(retrieve_module, "read_ahead", lambda paths: None)
    event = SimpleNamespace(
        is_cancelled=False, assoc=SimpleNamespace(requestor=SimpleNamespace(ae_title="SCU"))
    )
    context = SimpleNamespace(archive=SimpleNamespace(path_of=lambda relative: relative))
    retrieve = Retrieve("C-GET", event, destination="SCU")
    yields = sub_operations(event, context, retrieve, rows, lambda: [])

    first = [next(yields) for _ in range(3)]
    event.is_cancelled = True
    rest = list(yields)

    assert [status for status, _ in first] == [STATUS_PENDING] * 3
    assert first[0][1].SOPInstanceUID == "1.2.3.0" and first[0][1].stored_path == "0.dcm"
    assert not hasattr(first[1][1], "stored_path")  # refused: a stand-in counted failed
    assert first[2][1].SOPInstanceUID == "1.2.3.2"
    assert rest == [(STATUS_CANCEL, None)]
    assert retrieve.status == STATUS_CANCEL and retrieve.counts["failed"] >= 1
    time.sleep(0.1)  # anything still running in the pool has finished by now
    assert len(prepared) <= 3 + 1 + PREPARE_AHEAD
