"""Analysis and delivery with dcmtk programs: results arrive once, whatever stops between.

The destination is a real dcmtk `storescp` writing one file per received instance
(`+uf` unique names), so a result delivered twice would show up as two files.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pydicom
from analysis_support import (
    analysed,
    analysing_alone,
    analysing_and_delivering,
    delivered,
    wait_for,
)
from sqlalchemy import select
from support import siim_files

from ai.train.tiny_artifact import build_tiny_artifact
from node.testing.dcmtk import DCMTK_ENV, StoreSCP
from node.testing.index import count_instances, delivery_counts, index_connection, job_counts
from node.testing.node_process import node_command, node_env, restart_node, storescu, wait_for_log
from storage.models import Delivery, DeliveryState, JobState

DESTINATION = "STORESCP"


def test_every_result_arrives_once_across_destination_and_node_restarts(
    tmp_path: Path, node_factory, tiny_model: Path
) -> None:
    scp = StoreSCP(tmp_path / "received")
    scp.start()
    try:
        node = node_factory(analysing_and_delivering(tiny_model, DESTINATION, scp.port))
        files = siim_files()[:12]
        first, second = files[:6], files[6:]

        assert storescu(node, first).returncode == 0
        wait_for(delivered(node, 2 * len(first)), 180, "the first results to be delivered")

        scp.stop()  # the destination goes down
        assert storescu(node, second).returncode == 0
        wait_for(analysed(node, len(files)), 180, "the second batch to be analysed")
        wait_for(
            lambda: "pending" in delivery_counts(node) and _delivery_attempts_failed(node),
            30,
            "a failed delivery attempt",
        )

        code = node.stop()  # and the node restarts while deliveries are pending
        assert code == 0
        node = restart_node(node)
        scp.start()
        wait_for(delivered(node, 2 * len(files)), 120, "every result to be delivered")

        received = scp.received_uids()
        assert len(received) == 2 * len(files)
        assert set(received.values()) == {1}, f"delivered more than once: {received}"
        assert job_counts(node) == {JobState.DONE.value: len(files)}
        assert delivery_counts(node) == {DeliveryState.DELIVERED.value: 2 * len(files)}
        node.stop()
    finally:
        scp.stop()


def _delivery_attempts_failed(node) -> bool:
    with index_connection(node.db_url) as conn:
        return any(conn.scalars(select(Delivery.last_error).where(Delivery.last_error != "")))


def test_results_stay_on_the_node_for_a_caller_not_in_peers(
    tmp_path: Path, node_factory, tiny_model: Path
) -> None:
    node = node_factory(analysing_alone(tiny_model))
    files = siim_files()[:3]
    assert storescu(node, files).returncode == 0
    wait_for(analysed(node, len(files)), 180, "analysis")
    assert delivery_counts(node) == {}
    assert job_counts(node) == {JobState.DONE.value: len(files)}
    wait_for_log(node, "is not in [[peers]]")
    status = node_status(node)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert "instances: 9 (6 results made by this node)" in lines
    assert "analysis jobs: done 3" in lines
    assert "deliveries: none" in lines
    # ... and the status says that the results stay here, and why.
    assert "results kept on the node, not sent: 6 (of 3 images)" in lines
    # SIIM images under the demo model: no region, so no SEG, and the status says so.
    assert "result objects: SC stored 3; SEG not made 3; SR stored 3" in lines
    assert (
        "       3  caller 'STORESCU' is not in [[peers]] and no delivery.destination is set"
        in lines
    )


def test_analysis_waits_for_a_model_then_catches_up(
    tmp_path: Path, node_factory, tiny_model: Path
) -> None:
    model_dir = tmp_path / "later-model"
    node = node_factory(analysing_alone(model_dir, demo_model=False))
    files = siim_files()[:2]
    assert storescu(node, files).returncode == 0  # stored and queryable without a model
    wait_for(lambda: "waits for a model" in node.log_text(), 30, "the waiting-for-model line")
    assert job_counts(node) == {JobState.QUEUED.value: len(files)}
    build_tiny_artifact(model_dir, seed=2)
    wait_for(analysed(node, len(files)), 120, "analysis once the model appeared")
    assert node.log_text().count("waits for a model") == 1


def test_ineligible_images_are_stored_and_recorded_as_skipped(
    tmp_path: Path, node_factory, tiny_model: Path
) -> None:
    source = pydicom.dcmread(siim_files()[0])
    source.Modality = "MR"
    source.SOPInstanceUID = pydicom.uid.generate_uid()
    path = tmp_path / "mr.dcm"
    source.save_as(path)
    node = node_factory(analysing_alone(tiny_model))
    assert storescu(node, [path]).returncode == 0
    assert count_instances(node.db_url) == 1
    assert job_counts(node) == {JobState.SKIPPED.value: 1}
    status = node_status(node)
    assert "modality MR not in ['CR', 'DX']" in status.stdout


def node_status(node) -> subprocess.CompletedProcess:
    """`pneumonode status` on the node's configuration."""
    return subprocess.run(
        node_command(node.config_path, "status"),
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )


def _env() -> dict[str, str]:
    return {**node_env(), **DCMTK_ENV}


def test_worker_runs_as_its_own_process(tmp_path: Path, node_factory, tiny_model: Path) -> None:
    node = node_factory(analysing_alone(tiny_model, run_in_serve=False))
    files = siim_files()[:3]
    assert storescu(node, files).returncode == 0
    time.sleep(1.0)
    assert job_counts(node) == {JobState.QUEUED.value: len(files)}, "serve does not analyse"
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            node_command(node.config_path, "worker"),
            env=node_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(analysed(node, len(files)), 120, "the separate worker to analyse")
        assert job_counts(node) == {JobState.DONE.value: len(files)}
    finally:
        worker.terminate()
        assert worker.wait(timeout=30) == 0, log_path.read_text()[-2000:]
    assert "analysed SOP" in log_path.read_text()
