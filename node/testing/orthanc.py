"""A real Orthanc (Debian package) on loopback with its own temporary JSON config.

Used by the end-to-end tests and the benchmarks: Orthanc plays the hospital PACS that
sends images to the node and receives its results. Only its REST API on loopback is used.

Orthanc cannot bind port 0 and report the port, so it gets ports outside the kernel's
ephemeral range and starts again on others if it loses one. A node under test binds its
own port, so it is declared to Orthanc once it runs (`set_modality`), not beforehand.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.testing.dcmtk import DCMTK_ENV
from node.testing.ports import SERVER_START_TRIES, ServerDidNotStart, server_port

# A modality as (AE title, host, port), or Orthanc's object form (e.g. with "UseDicomTls").
Modality = tuple[str, str, int] | dict[str, Any]


# Where Debian's orthanc-dicomweb puts the DICOMweb plugin.
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def orthanc_binary() -> str:
    found = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/bin")
    if found is None:
        raise RuntimeError("Orthanc not found (apt install orthanc)")
    return found


@dataclass
class OrthancProcess:
    http_port: int
    dicom_port: int
    ae_title: str
    workdir: Path
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str = "application/json",
        timeout: float = 60,
    ) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", content_type)
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.read()

    def get_json(self, path: str) -> Any:
        return json.loads(self.request("GET", path))

    def post_json(self, path: str, payload: Any, timeout: float = 120) -> Any:
        data = self.request("POST", path, json.dumps(payload).encode(), timeout=timeout)
        return json.loads(data) if data else None

    def set_modality(self, name: str, modality: Modality) -> None:
        """Declare (or redeclare) a DICOM modality through the REST API, e.g. a node that
        has just logged the port it bound."""
        if isinstance(modality, tuple):
            ae_title, host, port = modality
            modality = {"AET": ae_title, "Host": host, "Port": port}
        self.request("PUT", f"/modalities/{name}", json.dumps(modality).encode())

    def upload(self, dicom_file: Path) -> dict[str, Any]:
        """POST /instances: store a file in Orthanc; returns its answer (ID, ParentStudy...)."""
        answer = self.request("POST", "/instances", dicom_file.read_bytes(), "application/dicom")
        return json.loads(answer)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_orthanc(
    workdir: Path,
    *,
    ae_title: str = "ORTHANC",
    modalities: dict[str, Modality] | None = None,
    sync_storage: bool = True,
    dicomweb: bool = False,
    extra: dict[str, Any] | None = None,
) -> OrthancProcess:
    """Start Orthanc with storage and SQLite index under `workdir`; wait for its REST API
    and its DICOM port. Its ports are chosen here (on a failed start, others are tried)
    unless `extra` sets "HttpPort" or "DicomPort".

    A modality is (AE title, host, port), or Orthanc's object form (e.g. with "UseDicomTls");
    `extra` adds or overrides configuration keys (e.g. "DicomTlsEnabled").
    `dicomweb` loads the DICOMweb plugin (Debian's orthanc-dicomweb), served at /dicom-web/.
    """
    if dicomweb and not DICOMWEB_PLUGIN.is_file():
        raise RuntimeError(f"{DICOMWEB_PLUGIN} not found (apt install orthanc-dicomweb)")
    plugins = [str(DICOMWEB_PLUGIN)] if dicomweb else []
    workdir.mkdir(parents=True, exist_ok=True)
    fixed = {"HttpPort", "DicomPort"} & set(extra or {})
    tries = 1 if fixed else SERVER_START_TRIES
    failures: list[str] = []
    for _ in range(tries):
        config = {
            "Name": "pneumonode-test-pacs",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"),
            "HttpPort": server_port(),
            "DicomPort": server_port(),
            "DicomAet": ae_title,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "StorageCompression": False,
            "SyncStorageArea": sync_storage,
            "Plugins": plugins,
            **({"DicomWeb": {"Enable": True, "Root": "/dicom-web/"}} if dicomweb else {}),
            "DicomModalities": {
                name: list(value) if isinstance(value, tuple) else value
                for name, value in (modalities or {}).items()
            },
            "StableAge": 2,
            **(extra or {}),
        }
        try:
            return _start(workdir, config)
        except ServerDidNotStart as exc:
            failures.append(str(exc))
    raise RuntimeError(f"Orthanc did not start in {tries} tries:\n" + "\n".join(failures))


def _start(workdir: Path, config: dict[str, Any], timeout: float = 30) -> OrthancProcess:
    """Orthanc with `config`, once its REST API answers and its DICOM port accepts."""
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    log_path = workdir / "orthanc.log"
    with log_path.open("ab") as log:
        # Orthanc's DICOM layer is dcmtk: without TCP_NODELAY each message waits ~40 ms.
        process = subprocess.Popen(
            [orthanc_binary(), str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=DCMTK_ENV,
        )
    orthanc = OrthancProcess(
        config["HttpPort"], config["DicomPort"], config["DicomAet"], workdir, process
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerDidNotStart(
                f"Orthanc exited with {process.returncode} (HTTP port {orthanc.http_port}, "
                f"DICOM port {orthanc.dicom_port}): {log_path.read_text()[-2000:]}"
            )
        try:
            orthanc.get_json("/system")
            with socket.create_connection(("127.0.0.1", orthanc.dicom_port), timeout=2):
                return orthanc
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.2)
    orthanc.stop()
    raise ServerDidNotStart(
        f"Orthanc did not answer on HTTP port {orthanc.http_port} and DICOM port "
        f"{orthanc.dicom_port} within {timeout} s"
    )
