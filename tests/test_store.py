"""C-STORE into the real node: dcmtk's storescu, pynetdicom in several transfer syntaxes,
the duplicate policies, and each bad input with its status and nothing left behind."""

from __future__ import annotations

import resource
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from dicom_data import association, chunked_sending, encode_body, file_bytes, write_raw_file
from pydicom import dcmread
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, SecondaryCaptureImageStorage
from sqlalchemy import select

from node.testing.dcmtk import echo
from node.testing.index import index_connection
from node.testing.node_process import NodeProcess, start_node, wait_for_log
from node.testing.samples import DX, second_copy, small_image
from storage.models import Instance, Series

SC = SecondaryCaptureImageStorage


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One default node for the tests that each look only at their own instances."""
    node = start_node(tmp_path_factory.mktemp("store_node"))
    yield node
    assert node.stop() == 0, node.log_text()


def index_rows(node: NodeProcess) -> dict[str, dict]:
    """SOP Instance UID -> instance row (with the series description) of the node's index."""
    with index_connection(node.db_url) as conn:
        rows = conn.execute(
            select(Instance, Series.series_description, Series.series_instance_uid).join(
                Series, Series.id == Instance.series_pk
            )
        ).mappings()
        return {row["sop_instance_uid"]: dict(row) for row in rows}


def stored_files(node: NodeProcess) -> list[Path]:
    return sorted((node.storage / "files").rglob("*.dcm"))


def leftovers(node: NodeProcess) -> list[Path]:
    return sorted((node.storage / "files").rglob(".incoming-*"))


# --- storing what senders send ------------------------------------------------------------


def test_storescu_sends_all_siim_files(siim_node: NodeProcess, siim_dicom_files) -> None:
    rows = index_rows(siim_node)
    assert len(rows) == 200
    files = stored_files(siim_node)
    assert len(files) == 200 and not leftovers(siim_node)
    sources = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in siim_dicom_files}
    assert set(rows) == set(sources)
    row = rows[next(iter(sources))]
    assert row["transfer_syntax_uid"] == "1.2.840.10008.1.2.4.50"  # as received, JPEG Baseline
    assert row["rows"] == 1024 and row["calling_ae"] == "STORESCU"
    for sop, source in list(sources.items())[:20]:
        stored = dcmread(siim_node.storage / "files" / rows[sop]["file_path"])
        original = dcmread(source)
        assert stored.PixelData == original.PixelData  # not transcoded
        assert stored.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert (siim_node.storage / "files" / rows[sop]["file_path"]).stat().st_size == rows[sop][
            "file_size"
        ]
    log = siim_node.log_text()
    assert log.count("stored SOP ") == 200
    patient = dcmread(siim_dicom_files[0], stop_before_pixels=True)
    assert str(patient.PatientID) not in log and str(patient.PatientName) not in log


@pytest.mark.parametrize(
    "transfer_syntax",
    [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless],
)
def test_pynetdicom_transfer_syntaxes(shared_node: NodeProcess, transfer_syntax: str) -> None:
    node = shared_node
    ds = small_image()
    if transfer_syntax == RLELossless:
        ds.compress(RLELossless)
    else:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    with association(node.host, node.port, node.ae_title, [(DX, [transfer_syntax])]) as assoc:
        status = assoc.send_c_store(ds)
    assert status.Status == 0x0000
    row = index_rows(node)[ds.SOPInstanceUID]
    assert row["transfer_syntax_uid"] == transfer_syntax
    stored = dcmread(node.storage / "files" / row["file_path"])
    assert stored.file_meta.TransferSyntaxUID == transfer_syntax
    assert stored.pixel_array.shape == (32, 32)


def test_jpeg2000_stored_as_received(shared_node: NodeProcess) -> None:
    node = shared_node
    ds = small_image()
    ds.compress(JPEG2000Lossless)
    with association(node.host, node.port, node.ae_title, [(DX, [JPEG2000Lossless])]) as assoc:
        assert assoc.send_c_store(ds).Status == 0x0000
    stored = dcmread(node.storage / "files" / index_rows(node)[ds.SOPInstanceUID]["file_path"])
    assert stored.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert stored.PixelData == ds.PixelData


def _send(node: NodeProcess, ds) -> int:
    with association(node.host, node.port, node.ae_title, [(DX, [ExplicitVRLittleEndian])]) as a:
        return int(a.send_c_store(ds).Status)


def test_duplicate_replace_keeps_one_row_and_the_newest_file(shared_node: NodeProcess) -> None:
    node = shared_node  # replace is the default policy
    first = small_image(series_description="first")
    second = small_image(sop_uid=first.SOPInstanceUID, series_description="second")
    assert _send(node, first) == 0x0000
    first_path = index_rows(node)[first.SOPInstanceUID]["file_path"]
    assert _send(node, second) == 0x0000  # same SOP Instance UID, now in another series
    row = index_rows(node)[first.SOPInstanceUID]
    assert row["series_instance_uid"] == second.SeriesInstanceUID
    assert row["series_description"] == "second"
    copies = [p for p in stored_files(node) if first.SOPInstanceUID in p.name]
    assert copies == [node.storage / "files" / row["file_path"]]
    assert row["file_path"] != first_path
    assert dcmread(copies[0]).SeriesDescription == "second"
    assert "replaced SOP " + first.SOPInstanceUID in wait_for_log(node, "replaced SOP")


def test_duplicate_keep_first_leaves_the_first_copy(node_factory) -> None:
    node = node_factory({"storage": {"duplicate_policy": "keep-first"}})
    first = small_image(series_description="first")
    second = second_copy(first, "second")
    assert _send(node, first) == 0x0000
    before = index_rows(node)
    assert _send(node, second) == 0x0000
    after = index_rows(node)
    assert after == before
    files = stored_files(node)
    assert len(files) == 1 and dcmread(files[0]).SeriesDescription == "first"
    assert "kept-first SOP " + first.SOPInstanceUID in wait_for_log(node, "kept-first SOP")


# --- bad input: the right status, nothing written or indexed, the node keeps serving --------


def _send_raw(node: NodeProcess, path: Path, abstract: str) -> tuple[int, str]:
    with (
        chunked_sending(),
        association(
            node.host, node.port, node.ae_title, [(abstract, [ExplicitVRLittleEndian])]
        ) as assoc,
    ):
        status = assoc.send_c_store(path)
        # The same association still stores a good instance afterwards.
        good = small_image(sop_class=abstract)
        good_path = path.with_suffix(".good.dcm")
        good_path.write_bytes(file_bytes(good))
        assert assoc.send_c_store(good_path).Status == 0x0000
    return int(status.Status), str(status.get("ErrorComment", ""))


def _assert_nothing_of(node: NodeProcess, *uids: str) -> None:
    rows = index_rows(node)
    files = [str(p) for p in stored_files(node)]
    for uid in uids:
        assert uid not in rows
        assert not any(uid in name for name in files)
    assert not leftovers(node)
    assert echo(node.host, node.port, node.ae_title)


def test_missing_sop_instance_uid(shared_node: NodeProcess, tmp_path: Path) -> None:
    node = shared_node
    ds = small_image()
    sop = ds.SOPInstanceUID
    del ds.SOPInstanceUID
    path = write_raw_file(tmp_path / "x.dcm", encode_body(ds), sop_class=DX, sop_instance=sop)
    status, comment = _send_raw(node, path, DX)
    assert status == 0xC220
    assert "SOPInstanceUID is missing" in comment
    _assert_nothing_of(node, sop)


def test_sop_class_not_matching_the_context(shared_node: NodeProcess, tmp_path: Path) -> None:
    node = shared_node
    ds = small_image(sop_class=CTImageStorage)
    path = write_raw_file(
        tmp_path / "x.dcm", encode_body(ds), sop_class=SC, sop_instance=ds.SOPInstanceUID
    )
    status, comment = _send_raw(node, path, SC)
    assert status == 0xA900
    assert "presentation context" in comment
    _assert_nothing_of(node, ds.SOPInstanceUID)


def test_sop_instance_not_matching_the_request(shared_node: NodeProcess, tmp_path: Path) -> None:
    node = shared_node
    ds = small_image()
    path = write_raw_file(
        tmp_path / "x.dcm", encode_body(ds), sop_class=DX, sop_instance=generate_uid()
    )
    status, comment = _send_raw(node, path, DX)
    assert status == 0xA900
    assert "SOP Instance UID" in comment
    _assert_nothing_of(node, ds.SOPInstanceUID)


@pytest.mark.parametrize(
    ("keyword", "bad_uid"),
    [
        ("SOPInstanceUID", "1.2.abc"),
        ("StudyInstanceUID", "../../../../tmp/escaped"),
        ("SeriesInstanceUID", "1.2.3/../../4"),
        ("SeriesInstanceUID", "1.2." + "3" * 70),
    ],
)
def test_invalid_uid_is_refused_and_never_a_path(
    shared_node: NodeProcess, tmp_path: Path, keyword: str, bad_uid: str
) -> None:
    node = shared_node
    ds = small_image()
    setattr(ds, keyword, bad_uid)
    sop = ds.SOPInstanceUID
    path = write_raw_file(tmp_path / "x.dcm", encode_body(ds), sop_class=DX, sop_instance=sop)
    status, comment = _send_raw(node, path, DX)
    assert status == 0xC220
    assert keyword in comment
    _assert_nothing_of(node, sop)
    assert not (tmp_path.parent / "escaped").exists()
    assert not Path("/tmp/escaped").exists()


def test_unreadable_dataset(shared_node: NodeProcess, tmp_path: Path) -> None:
    node = shared_node
    sop = generate_uid()
    garbage = b"\x08\x00\x18\x00UI\xff\x7f" + b"\x00garbage" * 50
    path = write_raw_file(tmp_path / "x.dcm", garbage, sop_class=DX, sop_instance=sop)
    status, comment = _send_raw(node, path, DX)
    assert status == 0xC210
    assert "cannot parse" in comment
    _assert_nothing_of(node, sop)


def _limit_file_size() -> None:
    """In the node's process: files larger than 1 MiB cannot be written (EFBIG), like a
    full disk; SIGXFSZ ignored so that the write fails instead of killing the process."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def test_failed_disk_write_is_out_of_resources(node_factory) -> None:
    node = node_factory(name="full", preexec_fn=_limit_file_size)
    big = small_image(rows=1024, columns=1024)  # 2 MiB of pixels
    small = small_image()
    with association(node.host, node.port, node.ae_title, [(DX, [ExplicitVRLittleEndian])]) as a:
        status = a.send_c_store(big)
        assert a.send_c_store(small).Status == 0x0000
    assert status.Status == 0xA700
    assert "cannot write the file" in status.ErrorComment
    _assert_nothing_of(node, big.SOPInstanceUID)
    assert set(index_rows(node)) == {small.SOPInstanceUID}
    # No empty study or series folder is left behind by the failed store (issue 19).
    assert not (node.storage / "files" / big.StudyInstanceUID).exists()
    assert (node.storage / "files" / small.StudyInstanceUID / small.SeriesInstanceUID).is_dir()


def test_unknown_calling_ae_rejected_when_configured(node_factory) -> None:
    node = node_factory(
        {
            "node": {"accept_unknown_callers": False},
            "peers": [{"ae_title": "KNOWNPACS", "host": "127.0.0.1", "port": 4242}],
        },
        name="strict",
    )
    assert echo(node.host, node.port, node.ae_title, calling="KNOWNPACS")
    assert not echo(node.host, node.port, node.ae_title, calling="STRANGER")
    ae = AE(ae_title="STRANGER")
    ae.add_requested_context(DX)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    assert assoc.is_rejected
    # PS3.8 A-ASSOCIATE-RJ: rejected-permanent, by the service user, calling AE not recognized.
    rejection = assoc.acceptor.primitive
    assert (rejection.result, rejection.result_source, rejection.diagnostic) == (1, 1, 3)
    wait_for_log(node, "association rejected: calling AE 'STRANGER'")
