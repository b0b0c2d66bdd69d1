"""The node's metrics as `serve` runs them: the multi-process folder set up before any
child starts, the HTTP listener started once the node accepts, both gone at stop."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from prometheus_client import REGISTRY
from prometheus_client.registry import CollectorRegistry

from node.config import Config
from node.context import NodeContext
from node.metrics import multiprocess
from node.metrics.collector import NodeCollector
from node.metrics.definitions import PREFIX, metrics
from node.metrics.health import Readiness
from node.metrics.http import MetricsHttpServer

log = logging.getLogger(__name__)


class _Forward:
    """The in-process registry as a collector (metrics without multi-process mode)."""

    def collect(self):  # noqa: ANN201
        return REGISTRY.collect()


def _counted() -> CollectorRegistry:
    """The counted metrics: every process's files, or this process's own."""
    registry = CollectorRegistry(auto_describe=False)
    if multiprocess.active():
        from prometheus_client.multiprocess import MultiProcessCollector

        MultiProcessCollector(registry)
    else:
        registry.register(_Forward())
    return registry


class NodeMetrics:
    """Made before the node starts (sets the environment its children inherit)."""

    def __init__(self, config: Config) -> None:
        self.settings = config.metrics
        self.config = config
        self._folder: Path | None = None
        self._server: MetricsHttpServer | None = None
        self._node: CollectorRegistry | None = None
        if self.settings.enabled:
            self._folder = multiprocess.start_folder()
        metrics()  # the supervisor's own metrics, in that folder

    def start(
        self,
        context: NodeContext,
        associations: Callable[[], int],
        listener: Callable[[], str | None],
    ) -> None:
        """Serve HTTP; a port that cannot be bound is logged and the node goes on."""
        if not self.settings.enabled:
            return
        node = CollectorRegistry(auto_describe=False)
        node.register(NodeCollector(self.config, context.engine, associations))
        self._node = node
        readiness = Readiness(self.config, context.engine, listener, self._model_loaded)
        address = (self.settings.address, self.settings.port)
        try:
            server = MetricsHttpServer(address, self.registry, readiness)
        except OSError as exc:
            log.error(
                "metrics: cannot listen on %s:%d (%s); /metrics and /health are off "
                "(metrics.port)", *address, exc.strerror or exc,
            )
            return
        self._server = server
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
        host, port = server.server_address[:2]
        log.info("metrics on http://%s:%d (/metrics, /health/live, /health/ready)", host, port)

    def registry(self) -> CollectorRegistry:
        """What one scrape reads: every process's files (or this process), and the node."""
        registry = _counted()
        if self._node is not None:
            registry.register(self._node)
        return registry

    def _model_loaded(self) -> bool:
        wanted = f"{PREFIX}_model_loaded"
        for family in _counted().collect():
            if family.name == wanted:
                return any(sample.value > 0 for sample in family.samples)
        return False

    def stop(self) -> None:
        """Stop answering HTTP (the node's processes may still count until they stop)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def close(self) -> None:
        """Remove the multi-process folder, once every child process has stopped."""
        self.stop()
        if self._folder is not None:
            multiprocess.remove_folder(self._folder)
            self._folder = None
