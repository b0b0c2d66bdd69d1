"""Every metric the node counts, made once per process on first use.

They are made lazily, not at import: prometheus_client picks its multi-process storage
when a metric is made, and `serve` sets PROMETHEUS_MULTIPROC_DIR (node.metrics.multiprocess)
only after the node's modules are imported. No label ever holds a UID, a patient or an
accession value: labels are commands, statuses, reasons, kinds, states and findings.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

PREFIX = "pneumonode"

# Seconds; a C-STORE is milliseconds to seconds, a result is seconds to many minutes
# (a destination that is down delays it until a retry gets through).
STORE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
INFERENCE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RESULT_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0, 14400.0)
PROBABILITY_BUCKETS = tuple(round(0.1 * step, 1) for step in range(1, 11))

# Outcomes of one delivery attempt.
DELIVERED = "delivered"
FAILED = "failed"  # this attempt failed; a retry is scheduled
GIVEN_UP = "given_up"  # failed, and no attempt is left (delivery.max_attempts, or hopeless)


@dataclass(frozen=True)
class Metrics:
    dimse_requests: Any
    associations_rejected: Any
    received_bytes: Any
    store_seconds: Any
    inference_seconds: Any
    result_seconds: Any
    results: Any
    deliveries: Any
    predictions: Any
    probability: Any
    model_loaded: Any


@functools.cache
def metrics() -> Metrics:
    """This process's metrics (made on the first call)."""
    from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

    disable_created_metrics()  # *_created series: noise on dashboards, absent multi-process
    made = Metrics(
        dimse_requests=Counter(
            f"{PREFIX}_dimse_requests",
            "DIMSE requests answered, by command and the final status sent (hex).",
            ["command", "status"],
        ),
        associations_rejected=Counter(
            f"{PREFIX}_associations_rejected",
            "Associations (or connections before one) refused, by reason.",
            ["reason"],
        ),
        received_bytes=Counter(
            f"{PREFIX}_received_bytes",
            "Bytes of datasets received by C-STORE (stored or refused).",
        ),
        store_seconds=Histogram(
            f"{PREFIX}_store_seconds",
            "C-STORE: request received to response sent.",
            buckets=STORE_BUCKETS,
        ),
        inference_seconds=Histogram(
            f"{PREFIX}_inference_seconds",
            "Model time per image (a batch's forward and heatmap over its images).",
            buckets=INFERENCE_BUCKETS,
        ),
        result_seconds=Histogram(
            f"{PREFIX}_result_seconds",
            "Image stored to every one of its results delivered.",
            buckets=RESULT_BUCKETS,
        ),
        results=Counter(
            f"{PREFIX}_results",
            "Result objects by kind and outcome (stored, not_made, failed).",
            ["kind", "outcome"],
        ),
        deliveries=Counter(
            f"{PREFIX}_deliveries",
            "Delivery attempts of result objects by outcome (delivered, failed, given_up).",
            ["outcome"],
        ),
        predictions=Counter(
            f"{PREFIX}_predictions",
            "Images analysed, by the finding the model reported.",
            ["finding"],
        ),
        probability=Histogram(
            f"{PREFIX}_probability",
            "The model's probability of the finding, per image (to watch for drift).",
            buckets=PROBABILITY_BUCKETS,
        ),
        model_loaded=Gauge(
            f"{PREFIX}_model_loaded",
            "1 while an analysis worker of this node holds a loaded model.",
            multiprocess_mode="livemax",
        ),
    )
    for outcome in (DELIVERED, FAILED, GIVEN_UP):
        made.deliveries.labels(outcome)  # present at 0 from the start: rate() works at once
    return made
