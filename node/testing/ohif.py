"""OHIF v3's built viewer served on loopback, with Orthanc's DICOMweb behind the same origin.

Used by the viewer test: a tiny threaded HTTP server serves the viewer's `dist` folder (every
unknown path gets index.html, as OHIF's client-side routes such as /viewer need), answers
/app-config.js with a configuration whose only data source is this server's /dicom-web, and
passes /dicom-web/... and /wado to Orthanc. One origin means no CORS headers are needed
from Orthanc. setup.sh fetches the viewer (npm's @ohif/app, integrity pinned) into a cache
folder; PNEUMONODE_OHIF_DIST names another `dist` folder.
"""

from __future__ import annotations

import mimetypes
import os
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

OHIF_VERSION = "3.13.2"

# Headers passed on to Orthanc and back; the others (Connection...) are per hop. The Host
# header passes so that the URLs Orthanc writes into its answers name this server.
_REQUEST_HEADERS = ("Accept", "Content-Type", "Range", "Host")
_RESPONSE_HEADERS = ("Content-Type", "Content-Length", "Content-Range", "ETag")
_PROXIED = ("/dicom-web/", "/wado")

# The data source as OHIF's own DICOMweb examples configure it for Orthanc; `{origin}` is
# this server. Study lazy loading and bulk data as Orthanc's plugin serves them.
APP_CONFIG = """window.config = {{
  routerBasename: '/',
  extensions: [],
  modes: [],
  showStudyList: true,
  showLoadingIndicator: true,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  maxNumberOfWebWorkers: 2,
  investigationalUseDialog: {{ option: 'never' }},
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {{
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {{
        friendlyName: 'Orthanc on loopback',
        name: 'orthanc',
        wadoUriRoot: '{origin}/wado',
        qidoRoot: '{origin}/dicom-web',
        wadoRoot: '{origin}/dicom-web',
        qidoSupportsIncludeField: false,
        supportsReject: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video',
        bulkDataURI: {{ enabled: true, relativeResolution: 'studies' }},
        omitQuotationForMultipartRequest: true,
      }},
    }},
  ],
}};
"""


def ohif_dist() -> Path:
    """The built viewer's folder: $PNEUMONODE_OHIF_DIST, else where setup.sh unpacks it."""
    if os.environ.get("PNEUMONODE_OHIF_DIST"):
        return Path(os.environ["PNEUMONODE_OHIF_DIST"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "pneumonode" / f"ohif-{OHIF_VERSION}" / "dist"


@dataclass
class OhifServer:
    """The running server; `url` is its origin, `requests` what the viewer asked for."""

    server: ThreadingHTTPServer
    thread: threading.Thread
    requests: list[tuple[str, str, int]]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def serve_ohif(dist: Path, orthanc_url: str) -> OhifServer:
    """Serve `dist` on a free loopback port, with Orthanc (at `orthanc_url`) behind it."""
    requests: list[tuple[str, str, int]] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            """Quiet: what was asked is kept in `requests` instead."""

        def do_GET(self) -> None:  # noqa: N802
            self._answer()

        def do_POST(self) -> None:  # noqa: N802
            self._answer()

        def _answer(self) -> None:
            path = self.path.split("?", 1)[0]
            if path.startswith(_PROXIED):
                status = self._proxy()
            elif path == "/app-config.js":
                origin = f"http://127.0.0.1:{self.server.server_address[1]}"
                status = self._send(200, "application/javascript",
                                    APP_CONFIG.format(origin=origin).encode())
            else:
                status = self._static(path)
            requests.append((self.command, self.path, status))

        def _static(self, path: str) -> int:
            target = (dist / path.lstrip("/")).resolve()
            if not target.is_relative_to(dist.resolve()) or not target.is_file():
                target = dist / "index.html"  # a client-side route such as /viewer
            kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
            if target.suffix == ".wasm":
                kind = "application/wasm"
            return self._send(200, kind, target.read_bytes())

        def _proxy(self) -> int:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            request = urllib.request.Request(
                orthanc_url + self.path, data=body, method=self.command
            )
            for name in _REQUEST_HEADERS:
                if self.headers.get(name):
                    request.add_header(name, self.headers[name])
            try:
                with urllib.request.urlopen(request, timeout=120) as answer:
                    status, headers, data = answer.status, answer.headers, answer.read()
            except urllib.error.HTTPError as error:
                status, headers, data = error.code, error.headers, error.read()
            self.send_response(status)
            for name in _RESPONSE_HEADERS:
                if name != "Content-Length" and headers.get(name):
                    self.send_header(name, headers[name])
            self._common_headers(len(data))
            self.wfile.write(data)
            return status

        def _send(self, status: int, kind: str, data: bytes) -> int:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self._common_headers(len(data))
            self.wfile.write(data)
            return status

        def _common_headers(self, length: int) -> None:
            # Cross-origin isolation lets OHIF's workers share memory (SharedArrayBuffer).
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
            self.send_header("Content-Length", str(length))
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="ohif-server", daemon=True)
    thread.start()
    return OhifServer(server, thread, requests)
