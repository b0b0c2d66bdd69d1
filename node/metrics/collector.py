"""Figures read when Prometheus scrapes, not counted: the jobs in the index by state, the
associations the node holds now, and what is running (build_info)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from importlib import metadata

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine

from ai.model.choice import DEMO_MODEL_DIR, META_FILE, choose_model
from node.config import Config
from node.metrics.definitions import PREFIX
from storage.models import JobState
from storage.report import job_counts

log = logging.getLogger(__name__)


def package_version() -> str:
    try:
        return metadata.version("pneumonode")
    except metadata.PackageNotFoundError:
        return "unknown"


def model_labels(config: Config) -> tuple[str, str]:
    """(name, version) of the model analysis uses now, from its JSON (no weights read)."""
    analysis = config.analysis
    if not analysis.enabled:
        return "none", ""
    choice = choose_model(analysis.model, analysis.demo_model)
    if choice is None:
        return "none", ""
    try:
        meta = json.loads((choice.folder / META_FILE).read_text())
        name, version = str(meta.get("name", "")), str(meta.get("version", ""))
    except (OSError, ValueError, AttributeError):
        name, version = "unreadable", ""
    if choice.folder == DEMO_MODEL_DIR and "DEMO" not in name.upper():
        name = f"{name} (DEMO)"
    return name, version


class NodeCollector(Collector):
    """pneumonode_jobs{state}, pneumonode_associations_active, pneumonode_build_info."""

    def __init__(self, config: Config, engine: Engine, associations: Callable[[], int]) -> None:
        self.config = config
        self.engine = engine
        self.associations = associations
        self.version = package_version()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily(
            f"{PREFIX}_jobs", "Analysis jobs in the index by state (queued: queue depth).",
            labels=["state"],
        )
        try:
            counts = job_counts(self.engine)
        except Exception as exc:  # the index is down: /health/ready says so; skip the gauge
            log.debug("jobs gauge: index not readable: %s", exc)
        else:
            for state in JobState:
                jobs.add_metric([state.value], counts.get(state.value, 0))
            yield jobs
        yield GaugeMetricFamily(
            f"{PREFIX}_associations_active",
            "DICOM associations the node holds now (every serve process).",
            value=self.associations(),
        )
        info = GaugeMetricFamily(
            f"{PREFIX}_build_info",
            "Always 1: the pneumonode version and the model analysis uses.",
            labels=["version", "model", "model_version"],
        )
        info.add_metric([self.version, *model_labels(self.config)], 1)
        yield info
