"""The HTTP listener of /metrics, /health/live and /health/ready.

It runs in threads of the supervising `serve` process, on its own address and port: a slow
or hostile HTTP client holds one thread for at most READ_TIMEOUT_SECONDS and at most
MAX_CONNECTIONS connections are served at once (more are closed at once), while the DICOM
listeners keep their own threads and processes.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

log = logging.getLogger(__name__)

READ_TIMEOUT_SECONDS = 10.0
MAX_CONNECTIONS = 16


class _Handler(BaseHTTPRequestHandler):
    server: MetricsHttpServer
    timeout = READ_TIMEOUT_SECONDS  # socket timeout of the connection (StreamRequestHandler)
    server_version = "pneumonode-metrics"

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, generate_latest(self.server.registry()), CONTENT_TYPE_LATEST)
        elif path == "/health/live":
            self._json(200, {"status": "live"})
        elif path == "/health/ready":
            problems = self.server.readiness()
            if problems:
                self._json(503, {"status": "not ready", "problems": problems})
            else:
                self._json(200, {"status": "ready"})
        else:
            self._json(404, {"error": "not found; try /metrics, /health/live, /health/ready"})

    def _json(self, code: int, body: dict) -> None:
        self._send(code, json.dumps(body).encode() + b"\n", "application/json")

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - its signature
        log.debug("metrics http %s: " + format, self.address_string(), *args)


class MetricsHttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        registry: Callable[[], CollectorRegistry],
        readiness: Callable[[], list[str]],
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.registry = registry
        self.readiness = readiness
        self._connections = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, _Handler)

    def process_request(self, request, client_address) -> None:
        if not self._connections.acquire(blocking=False):
            log.warning("metrics http: %d connections open; closed one from %s",
                        MAX_CONNECTIONS, client_address[0])
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()

    def handle_error(self, request, client_address) -> None:
        log.debug("metrics http: error serving %s", client_address[0], exc_info=True)
