"""Helpers for the analysis tests: a tiny model, waiting on the node's queues, results."""

from __future__ import annotations

import csv
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from node.testing.index import delivery_counts, job_counts
from node.testing.node_process import NodeProcess, node_command, node_env
from storage.models import DeliveryState, JobState


def analysing_alone(model: Path, **analysis: object) -> dict:
    """Config overrides: analysis on with `model`, on the CPU, no peers to deliver to."""
    settings = {
        "enabled": True,
        "model": str(model),
        "device": "cpu",
        "batch_size": 4,
        "max_wait_seconds": 0.2,
        **analysis,
    }
    return {"analysis": settings, "peers": []}


def analysing_and_delivering(
    model: Path, destination: str, destination_port: int, **delivery: object
) -> dict:
    """Config overrides: `analysing_alone`, with results delivered to the AE `destination`
    listening on loopback at `destination_port`, retried quickly."""
    return analysing_alone(model) | {
        "delivery": {
            "destination": destination,
            "retry_initial_seconds": 0.3,
            "retry_max_seconds": 1.0,
            **delivery,
        },
        "peers": [{"ae_title": destination, "host": "127.0.0.1", "port": destination_port}],
    }


def wait_for(condition: Callable[[], bool], timeout: float, what: str, step: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def analysed(node: NodeProcess, expected: int) -> Callable[[], bool]:
    def done() -> bool:
        counts = job_counts(node)
        return counts.get(JobState.DONE.value, 0) + counts.get(JobState.FAILED.value, 0) >= expected

    return done


def delivered(node: NodeProcess, expected: int) -> Callable[[], bool]:
    return lambda: delivery_counts(node).get(DeliveryState.DELIVERED.value, 0) >= expected


def predict_with_cli(model_dir: Path, files: list[Path], out_csv: Path) -> dict[str, float]:
    """`pneumonode predict` on the files: SOP Instance UID -> probability."""
    result = subprocess.run(
        node_command(
            Path("unused.toml"), "predict", str(model_dir), *map(str, files), "--csv", str(out_csv)
        ),
        env=node_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    # `predict` needs no config file; --config only has to be accepted.
    assert result.returncode == 0, result.stderr
    with out_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    uid_key = next(k for k in rows[0] if "uid" in k.lower())
    probability_key = next(k for k in rows[0] if "prob" in k.lower())
    return {row[uid_key]: float(row[probability_key]) for row in rows}
