"""Bad input against one real node: every case of tests/bad_inputs.py gets its own DIMSE
status and ErrorComment, leaves no file, no temporary and no index row, and the node still
answers C-ECHO afterwards; C-STOREs cut off by an A-ABORT or a closed connection leave
nothing either; odd character sets are stored byte for byte; and at the end nothing was
written outside the node's storage folder and its workdir."""

from __future__ import annotations

import re
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bad_inputs import CASES, ESCAPE_MARKER, Case, Payload
from dicom_data import association, chunked_sending, encode_body, file_bytes, write_raw_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from raw_pdus import c_store_command, pdata_tf, send_pdus
from sqlalchemy import select

from node.testing.dcmtk import echo
from node.testing.index import index_connection
from node.testing.node_process import NodeProcess, start_node, wait_for_log
from node.testing.samples import DX, small_image
from storage.models import Instance, Patient, Series, Study

MAX_INSTANCE_MIB = 4
WORKDIR_ENTRIES = {"config.toml", "node.log", "storage"}
STORAGE_ENTRIES = {
    "files",
    "index.sqlite",
    "index.sqlite-journal",
    "index.sqlite-wal",
    "index.sqlite-shm",
    "index.sqlite-writers",  # storage.database.WriterTurns
    "writers.lock",
}
UID_PATH_PART = re.compile(r"^[0-9]+(\.[0-9]+)*$")

# The path-traversal and overlong UIDs are meant: pydicom's warnings about them are not news.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning"),
    pytest.mark.filterwarnings("ignore:The value length .* allowed for VR UI:UserWarning"),
]


@pytest.fixture(scope="module")
def bad_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One node for the whole corpus, with a small size limit so the oversize cases are
    cheap to build and send."""
    node = start_node(
        tmp_path_factory.mktemp("bad_input_node"),
        {"storage": {"max_instance_mib": MAX_INSTANCE_MIB}},
    )
    yield node
    assert node.stop() == 0, node.log_text()[-3000:]


# --- what the node holds ------------------------------------------------------------------


def index_rows(node: NodeProcess) -> dict[str, dict]:
    """SOP Instance UID -> the instance's row with its series, study and patient keys."""
    with index_connection(node.db_url) as conn:
        rows = conn.execute(
            select(
                Instance.sop_instance_uid,
                Instance.file_path,
                Series.series_instance_uid,
                Study.study_instance_uid,
                Patient.patient_id,
            )
            .join(Series, Series.id == Instance.series_pk)
            .join(Study, Study.id == Series.study_pk)
            .join(Patient, Patient.id == Study.patient_pk)
        ).mappings()
        return {row["sop_instance_uid"]: dict(row) for row in rows}


def index_keys(node: NodeProcess) -> set[str]:
    """Every patient ID, study, series and SOP Instance UID the index holds."""
    with index_connection(node.db_url) as conn:
        keys: set[str] = set()
        for column in (
            Patient.patient_id,
            Study.study_instance_uid,
            Series.series_instance_uid,
            Instance.sop_instance_uid,
        ):
            keys.update(conn.scalars(select(column)))
        return keys


def stored_files(node: NodeProcess) -> list[Path]:
    return sorted(p for p in (node.storage / "files").rglob("*") if p.is_file())


def leftovers(node: NodeProcess) -> list[Path]:
    return sorted((node.storage / "files").rglob(".incoming-*"))


def assert_nothing_of(node: NodeProcess, *keys: str) -> None:
    """No index row and no file (temporary or not) names any of `keys`; C-ECHO works."""
    held = index_keys(node)
    files = [str(p) for p in stored_files(node)]
    for key in keys:
        assert key not in held
        assert not [name for name in files if key in name]
    assert not leftovers(node)
    assert echo(node.host, node.port, node.ae_title)


# --- sending ------------------------------------------------------------------------------


def store(node: NodeProcess, ds: Dataset) -> int:
    with association(node.host, node.port, node.ae_title, [(DX, [ExplicitVRLittleEndian])]) as a:
        return int(a.send_c_store(ds).Status)


def send_raw(node: NodeProcess, folder: Path, payload: Payload) -> tuple[int, str]:
    """Send `payload` byte for byte, then a good instance over the same association (which
    must still store it); returns the bad one's status and ErrorComment."""
    path = write_raw_file(
        folder / "bad.dcm",
        payload.body,
        sop_class=payload.sop_class,
        sop_instance=payload.sop_instance,
        transfer_syntax=payload.transfer_syntax,
    )
    good = small_image()
    good_path = folder / "good.dcm"
    good_path.write_bytes(file_bytes(good))
    contexts = [(payload.sop_class, [payload.transfer_syntax])]
    if (payload.sop_class, payload.transfer_syntax) != (DX, ExplicitVRLittleEndian):
        contexts.append((DX, [ExplicitVRLittleEndian]))
    with chunked_sending(), association(node.host, node.port, node.ae_title, contexts) as assoc:
        status = assoc.send_c_store(path)
        assert assoc.send_c_store(good_path).Status == 0x0000
    return int(status.Status), str(status.get("ErrorComment", ""))


# --- the corpus ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused(bad_node: NodeProcess, tmp_path: Path, case: Case) -> None:
    node = bad_node
    payload = case.build()
    for ds in payload.prior:
        assert store(node, ds) == 0x0000
    status, comment = send_raw(node, tmp_path, payload)
    assert status == case.status, f"got 0x{status:04X} {comment!r}"
    for text in (*case.comment, *payload.comment_has):
        assert text in comment
    for text in payload.comment_lacks:
        assert text not in comment
    assert_nothing_of(node, payload.sop_instance, *payload.absent)
    rows = index_rows(node)
    for ds in payload.prior:  # still where it was stored, under its own patient
        row = rows[ds.SOPInstanceUID]
        assert row["patient_id"] == ds.PatientID
        assert row["study_instance_uid"] == ds.StudyInstanceUID
        assert row["series_instance_uid"] == ds.SeriesInstanceUID
        assert (node.storage / "files" / row["file_path"]).is_file()


def test_corpus_is_large_and_distinct() -> None:
    names = [c.name for c in CASES]
    assert len(names) >= 32 and len(set(names)) == len(names)
    assert len({c.status for c in CASES}) == 11


# --- cut-off associations -----------------------------------------------------------------


def test_raw_c_store_pdus_are_understood(bad_node: NodeProcess) -> None:
    """The control for the cut-off cases: the same hand-made PDUs, with the dataset's
    last fragment too, store the instance."""
    node = bad_node
    ds = small_image(rows=256, columns=256)
    body = encode_body(ds)
    third = len(body) // 3
    with association(node.host, node.port, node.ae_title, [(DX, [ExplicitVRLittleEndian])]) as a:
        context_id = a.accepted_contexts[0].context_id
        send_pdus(
            a,
            pdata_tf(context_id, 0b11, c_store_command(DX, ds.SOPInstanceUID))
            + pdata_tf(context_id, 0b00, body[:third])
            + pdata_tf(context_id, 0b10, body[third:]),
        )
        deadline = time.monotonic() + 10
        while ds.SOPInstanceUID not in index_rows(node):
            assert time.monotonic() < deadline, "the raw C-STORE was not stored"
            time.sleep(0.05)


@pytest.mark.parametrize("ending", ["a_abort", "tcp_close", "a_abort_after_command_only"])
def test_cut_off_c_store_leaves_nothing(bad_node: NodeProcess, ending: str) -> None:
    node = bad_node
    ds = small_image(rows=256, columns=256)  # 128 KiB of pixels: the first fragment is a part
    body = encode_body(ds)
    calling = {"a_abort": "CUT-ABORT", "tcp_close": "CUT-CLOSE"}.get(ending, "CUT-COMMAND")
    with association(
        node.host, node.port, node.ae_title, [(DX, [ExplicitVRLittleEndian])], calling=calling
    ) as assoc:
        context_id = assoc.accepted_contexts[0].context_id
        pdus = pdata_tf(context_id, 0b11, c_store_command(DX, ds.SOPInstanceUID))
        if ending != "a_abort_after_command_only":
            pdus += pdata_tf(context_id, 0b00, body[: len(body) // 3])
        raw = send_pdus(assoc, pdus)
        time.sleep(0.2)  # let the node take the fragments in
        assert assoc.is_established  # the node took them as a message under way
        if ending == "tcp_close":
            raw.shutdown(socket.SHUT_RDWR)
            assoc.dul.socket.close()
        else:
            assoc.abort()
    wait_for_log(node, f"association aborted: calling AE {calling!r}")
    assert_nothing_of(node, ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID)


# --- character sets: odd but readable, stored as sent ---------------------------------------


def _charset_body(charset: bytes, patient_name: bytes) -> tuple[Dataset, bytes]:
    """A valid image whose Specific Character Set and Patient Name bytes are replaced by
    `charset` and `patient_name` (same lengths as the placeholders)."""
    ds = small_image(patient_name="PLACEHOLDER^NAME")
    body = encode_body(ds)
    assert len(charset) == len(b"ISO_IR 100") and len(patient_name) == len(b"PLACEHOLDER^NAME")
    body = body.replace(b"ISO_IR 100", charset, 1).replace(b"PLACEHOLDER^NAME", patient_name, 1)
    return ds, body


@pytest.mark.parametrize(
    ("charset", "patient_name"),
    [
        (b"ISO_IR 999", b"Unknown^Charset "),
        (b"ISO_IR 192", b"M\xfcller^J\xc3\xa9r\xf4me\xffX"),  # Latin-1 and a stray 0xFF in UTF-8
    ],
    ids=["unknown_charset", "invalid_utf8_in_pn"],
)
def test_odd_character_set_is_stored_byte_for_byte(
    bad_node: NodeProcess, tmp_path: Path, charset: bytes, patient_name: bytes
) -> None:
    node = bad_node
    ds, body = _charset_body(charset, patient_name)
    status, comment = send_raw(
        node, tmp_path, Payload(body, sop_class=DX, sop_instance=ds.SOPInstanceUID)
    )
    assert status == 0x0000, comment
    row = index_rows(node)[ds.SOPInstanceUID]
    stored = (node.storage / "files" / row["file_path"]).read_bytes()
    assert stored[128:132] == b"DICM" and stored[132:140] == b"\x02\x00\x00\x00UL\x04\x00"
    meta_end = 144 + struct.unpack_from("<I", stored, 140)[0]
    assert stored[meta_end:] == body
    assert row["patient_id"] == ds.PatientID


# --- last: nothing outside the storage folder and the workdir -------------------------------


def test_nothing_written_outside_storage(
    bad_node: NodeProcess, tmp_path_factory: pytest.TempPathFactory
) -> None:
    node = bad_node
    workdir = node.config_path.parent
    assert {p.name for p in workdir.iterdir()} == WORKDIR_ENTRIES
    assert {p.name for p in node.storage.iterdir()} <= STORAGE_ENTRIES
    files_root = node.storage / "files"
    indexed = {row["file_path"] for row in index_rows(node).values()}
    on_disk = set()
    for path in stored_files(node):
        relative = path.relative_to(files_root)
        assert path.suffix == ".dcm", relative
        assert all(UID_PATH_PART.match(part) for part in relative.with_suffix("").parts)
        on_disk.add(relative.as_posix())
    assert on_disk == indexed
    for folder in (Path("/tmp"), tmp_path_factory.getbasetemp(), workdir.parent):
        assert not [p for p in folder.glob(f"*{ESCAPE_MARKER}*")], folder
    assert not [p for p in tmp_path_factory.getbasetemp().rglob(f"*{ESCAPE_MARKER}*")]
    log = node.log_text()
    assert "Traceback" not in log and "unexpected error" not in log
