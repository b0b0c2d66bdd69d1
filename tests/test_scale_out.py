"""Scale-out: two `serve` nodes and two `pneumonode worker`s share one index and one folder.

As on two hosts sharing a PostgreSQL server and a storage folder (here on loopback, and on
SQLite as on one host): each node runs serve processes and its own result sender, the
workers run apart. Senders spread the instances over both nodes. At the end every instance
is stored once, analysed exactly once (one job attempt, one SC and one SR), and every result
reaches the PACS (a dcmtk storescp writing one file per received instance) exactly once.
"""

from __future__ import annotations

import subprocess
import threading
from collections import Counter
from pathlib import Path

from analysis_support import wait_for
from pynetdicom import AE
from sqlalchemy import func, select

from node.testing.dcmtk import StoreSCP
from node.testing.index import index_connection
from node.testing.node_process import node_command, node_env, start_node
from node.testing.samples import small_image
from storage.models import AnalysisJob, Delivery, DeliveryState, Instance, JobState

PACS = "PACS"
SENDERS_PER_NODE = 2


def _overrides(storage: Path, db_url: str, model: Path, pacs_port: int) -> dict:
    return {
        "node": {"processes": 2},
        "storage": {"folder": str(storage), "database_url": db_url},
        "analysis": {
            "enabled": True,
            "run_in_serve": False,
            "model": str(model),
            "device": "cpu",
            "batch_size": 16,
            "max_wait_seconds": 0.2,
        },
        "delivery": {"destination": PACS, "retry_initial_seconds": 0.3, "retry_max_seconds": 1.0},
        "peers": [{"ae_title": PACS, "host": "127.0.0.1", "port": pacs_port}],
    }


def _send(host: str, port: int, ae_title: str, count: int, failures: list[str]) -> None:
    ae = AE(ae_title="SCALEOUT")
    ae.add_requested_context(small_image().SOPClassUID)
    assoc = ae.associate(host, port, ae_title=ae_title)
    if not assoc.is_established:
        failures.append(f"no association with {port}")
        return
    for number in range(count):
        status = assoc.send_c_store(small_image(patient_id=f"SCALE-{number % 50}"))
        if getattr(status, "Status", None) != 0x0000:
            failures.append(f"C-STORE answered {status}")
    assoc.release()


def _counts(db_url: str) -> dict[str, object]:
    with index_connection(db_url) as conn:
        return {
            "images": conn.scalar(
                select(func.count()).select_from(Instance).where(Instance.is_result.is_(False))
            ),
            "results": conn.scalar(
                select(func.count()).select_from(Instance).where(Instance.is_result.is_(True))
            ),
            "jobs": dict(
                conn.execute(
                    select(AnalysisJob.state, func.count()).group_by(AnalysisJob.state)
                ).all()
            ),
            "job_attempts": dict(
                conn.execute(
                    select(AnalysisJob.attempts, func.count()).group_by(AnalysisJob.attempts)
                ).all()
            ),
            "deliveries": dict(
                conn.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all()
            ),
            "delivery_attempts": dict(
                conn.execute(
                    select(Delivery.attempts, func.count()).group_by(Delivery.attempts)
                ).all()
            ),
        }


def _run_scale_out(tmp_path: Path, db_url: str, model: Path, instances: int) -> None:
    storage = tmp_path / "shared-storage"
    pacs = StoreSCP(tmp_path / "pacs", ae_title=PACS)
    pacs.start()
    nodes = []
    workers: list[subprocess.Popen] = []
    try:
        overrides = _overrides(storage, db_url, model, pacs.port)
        nodes = [start_node(tmp_path / f"node-{n}", overrides) for n in (1, 2)]
        for n in (1, 2):
            log = (tmp_path / f"worker-{n}.log").open("ab")
            workers.append(
                subprocess.Popen(
                    node_command(nodes[0].config_path, "worker"),
                    env=node_env(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        failures: list[str] = []
        per_sender = instances // (len(nodes) * SENDERS_PER_NODE)
        senders = [
            threading.Thread(
                target=_send, args=(node.host, node.port, node.ae_title, per_sender, failures)
            )
            for node in nodes
            for _ in range(SENDERS_PER_NODE)
        ]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        assert failures == []

        def all_delivered() -> bool:
            counts = _counts(db_url)["deliveries"]
            return counts.get(DeliveryState.DELIVERED, 0) >= 2 * instances

        wait_for(all_delivered, 900, f"{2 * instances} results delivered", step=1.0)
        counts = _counts(db_url)
        assert counts["images"] == instances
        assert counts["results"] == 2 * instances, "one SC and one SR per image, no more"
        assert counts["jobs"] == {JobState.DONE: instances}
        assert counts["job_attempts"] == {1: instances}, "no job was taken twice"
        assert counts["deliveries"] == {DeliveryState.DELIVERED: 2 * instances}
        # storescp serves one association at a time: while one node's sender holds it, the
        # other's attempt may fail and be retried (a CI run retried 5 of 3,200). A retry
        # never sends twice what arrived once: the PACS's count below says so.
        assert min(counts["delivery_attempts"]) >= 1 and max(counts["delivery_attempts"]) <= 3
        received = pacs.received_uids()
        assert len(received) == 2 * instances
        assert Counter(received.values()) == {1: 2 * instances}, "a result arrived twice"
        worker_logs = "".join(
            (tmp_path / f"worker-{n}.log").read_text(errors="replace") for n in (1, 2)
        )
        assert "Traceback" not in worker_logs
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(timeout=90)
        for node in nodes:
            node.stop(timeout=60)
        pacs.stop()


def test_two_nodes_and_two_workers_on_sqlite(tmp_path: Path, tiny_model: Path) -> None:
    storage = tmp_path / "shared-storage"
    _run_scale_out(tmp_path, f"sqlite:///{storage / 'index.sqlite'}", tiny_model, 400)


def test_two_nodes_and_two_workers_on_postgres(
    tmp_path: Path, tiny_model: Path, postgres_url: str
) -> None:
    _run_scale_out(tmp_path, postgres_url, tiny_model, 1600)
