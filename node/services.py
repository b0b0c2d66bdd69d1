"""The background services that run beside the DICOM server, and `pneumonode worker`.

`serve` always runs the result sender (deliveries may be queued by a worker elsewhere)
and, when analysis is enabled and `analysis.run_in_serve` is true, the analysis worker.
`pneumonode worker` runs the worker alone against the same database and storage folder,
for example on a GPU machine.
"""

from __future__ import annotations

import logging

from node.config import Config
from node.context import NodeContext, build_context
from node.sender import DeliverySender
from node.server import ServiceFactory, run_until_signalled
from node.worker import AnalysisWorker

log = logging.getLogger(__name__)


def node_services(config: Config) -> list[ServiceFactory]:
    """Factories of the services `serve` starts once its context exists."""
    senders: list[DeliverySender] = []

    def sender(context: NodeContext) -> DeliverySender:
        service = DeliverySender(context)
        senders.append(service)
        return service

    def wake_senders() -> None:
        for service in senders:
            service.wake()

    def worker(context: NodeContext) -> AnalysisWorker:
        return AnalysisWorker(context, on_results=wake_senders)

    factories: list[ServiceFactory] = [sender]
    if config.analysis.enabled and config.analysis.run_in_serve:
        factories.append(worker)
    return factories


def run_worker(config: Config) -> int:
    """Run the analysis worker alone until SIGINT or SIGTERM."""
    if not config.analysis.enabled:
        log.warning("analysis.enabled is false: the worker will find no queued jobs")
    context = build_context(config)
    worker = AnalysisWorker(context, low_priority=False)

    def start() -> None:
        worker.start()
        log.info(
            "analysis worker started (model %s, device %s)",
            config.analysis.model,
            config.analysis.device,
        )

    def stop() -> None:
        worker.stop()
        context.engine.dispose()

    return run_until_signalled(start, stop)
