"""The dcmtk programs (apt install dcmtk): echoscu to see a server answer, and storescp,
the destination that receives what a node sends."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from pydicom import dcmread

from node.testing.ports import SAME_PORT_TRIES, ServerDidNotStart, start_on_server_port

# dcmtk waits ~40 ms per message with Nagle's algorithm unless told otherwise.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def dcmtk(program: str) -> str:
    """Absolute path of a dcmtk program; the venv's pynetdicom apps share some names."""
    venv_bin = Path(sys.executable).parent.resolve()
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    search = [d for d in dirs if Path(d).resolve() != venv_bin] + ["/usr/bin", "/usr/local/bin"]
    found = shutil.which(program, path=os.pathsep.join(search))
    if found is None:
        raise RuntimeError(f"dcmtk program {program!r} not found (apt install dcmtk)")
    return found


def echo(host: str, port: int, ae_title: str, calling: str = "ECHOSCU", timeout: int = 5) -> bool:
    """True when a C-ECHO with dcmtk's echoscu succeeds within `timeout` seconds for each of
    connect, association and response (a listener that never answers is a failure)."""
    result = subprocess.run(
        [dcmtk("echoscu"), "-aet", calling, "-aec", ae_title]
        + ["-to", str(timeout), "-ta", str(timeout), "-td", str(timeout), host, str(port)],
        env=DCMTK_ENV,
        capture_output=True,
        timeout=timeout + 10,
    )
    return result.returncode == 0


class StoreSCP:
    """dcmtk storescp, stoppable and restartable; one file per instance received (`+uf`
    unique names), so a duplicate delivery shows up as a second file; it accepts every
    transfer syntax (`+xa`), as a PACS would, unless `options` say otherwise (`+xi`:
    Implicit VR Little Endian only; `+B`: write the received dataset bit for bit).

    storescp cannot bind port 0 and report it, so the first start takes a `server_port()`
    (another one if it loses that port); `port` is then fixed, and a restart (a destination
    coming back) tries that same port again."""

    def __init__(
        self, folder: Path, ae_title: str = "STORESCP", options: tuple[str, ...] = ("+xa",)
    ) -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.options = options
        self.port = 0  # chosen by the first start
        self.process: subprocess.Popen | None = None
        # Beside the folder, not in it: the folder holds only received files.
        self.log_path = folder.with_name(f"{folder.name}.storescp.log")
        folder.mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 10) -> None:
        if not self.port:
            self.port = start_on_server_port(
                lambda port: self._start_on(port, timeout), f"storescp {self.ae_title}"
            )
            return
        for attempt in range(SAME_PORT_TRIES):
            try:
                self._start_on(self.port, timeout)
                return
            except ServerDidNotStart:
                if attempt == SAME_PORT_TRIES - 1:
                    raise
                time.sleep(1)

    def _start_on(self, port: int, timeout: float) -> int:
        """storescp on `port`, answering C-ECHO; returns the port."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    dcmtk("storescp"),
                    *self.options,
                    "-aet",
                    self.ae_title,
                    "+uf",
                    "-od",
                    str(self.folder),
                    str(port),
                ],
                env=DCMTK_ENV,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while not echo("127.0.0.1", port, self.ae_title, timeout=2):
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise ServerDidNotStart(
                    f"storescp did not answer C-ECHO on port {port} (exit status "
                    f"{self.process.returncode}; log {self.log_path})"
                )
            time.sleep(0.05)
        return port

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def received_uids(self) -> Counter[str]:
        uids: Counter[str] = Counter()
        for path in self.folder.iterdir():
            if path.is_file():
                uids[str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)] += 1
        return uids
