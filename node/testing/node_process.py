"""A real `pneumonode serve` process, started from a configuration file the way a user
starts it, and the clients that drive it over TCP on loopback (dcmtk's storescu, a
pynetdicom C-FIND). The node binds port 0 and the port it logs is the one used."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import Dataset

from node.testing.config_files import config_data, dump_toml, write_config
from node.testing.dcmtk import DCMTK_ENV, dcmtk, echo
from node.testing.ports import server_port

# The folder that holds the packages, put on a node's PYTHONPATH.
SOURCE_ROOT = Path(__file__).resolve().parents[2]


def node_command(config_path: Path, subcommand: str = "serve", *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "node.process.cli",
        subcommand,
        "--config",
        str(config_path),
        *extra,
    ]


def node_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SOURCE_ROOT), env.get("PYTHONPATH")]))
    return env


# The line `serve` logs for each listener (node/process/server.py, and the supervisor of
# several serve processes): the port it bound, which is how a test learns it. A serve
# process's own line (tagged "[serve N]") does not count: the supervisor logs its line once
# every serve process accepts, and a sender that starts before would find one process only.
LISTENING = re.compile(
    r"^(?!.*\[serve \d+\]: ).*?"
    r"listening as .+? on (?P<host>\S+):(?P<port>\d+)(?P<tls> with DICOM TLS)?",
    re.MULTILINE,
)

# The line `serve` logs when its metrics listener is up (node/metrics/service.py).
METRICS = re.compile(r"metrics on (?P<url>http://\S+:\d+) ")


@dataclass
class NodeProcess:
    """A running `pneumonode serve` and what a client needs to reach and inspect it."""

    host: str
    port: int
    ae_title: str
    storage: Path
    db_url: str
    config_path: Path
    log_path: Path
    process: subprocess.Popen
    stopped: bool = field(default=False)
    # A calling AE title the node accepts (a known peer when unknown callers are refused).
    probe_ae: str = "ECHOSCU"
    # The TLS listener's port, when the configuration has one.
    tls_port: int | None = None
    # Whether each listener the configuration asks for is the TLS one.
    listeners: tuple[bool, ...] = (False,)
    # Where this run's lines start in log_path (a restart may append to an earlier log).
    log_offset: int = 0
    # Whether this revision logs "listening as <AE> on <host>:<port>" for each listener
    # (start_node's nodes do; the benchmarks' older revisions may not).
    logs_listening: bool = False

    @property
    def db_path(self) -> Path:
        return self.storage / "index.sqlite"

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def run_log(self) -> str:
        """This run's part of the log."""
        return self.log_path.read_bytes()[self.log_offset :].decode("utf-8", errors="replace")

    def bound_ports(self) -> dict[bool, int]:
        """{is TLS: port} of the listeners this run has logged so far."""
        ports: dict[bool, int] = {}
        for match in LISTENING.finditer(self.run_log()):
            ports.setdefault(match["tls"] is not None, int(match["port"]))
        return ports

    def metrics_url(self, timeout: float = 10) -> str:
        """http://host:port of the metrics listener this run logged (waits for the line)."""
        deadline = time.monotonic() + timeout
        while (match := METRICS.search(self.run_log())) is None:
            if time.monotonic() > deadline:
                raise AssertionError("no 'metrics on http://...' line in the node's log")
            time.sleep(0.05)
        return match["url"]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Send `sig` and wait; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        self.stopped = True
        return code

    def kill(self) -> None:
        """kill -9: the crash test's power cut."""
        self.process.kill()
        self.process.wait()
        self.stopped = True


class NodeExited(RuntimeError):
    """`serve` exited before it was serving; `log` is what it wrote."""

    def __init__(self, code: int, log: str) -> None:
        super().__init__(f"pneumonode exited with {code}:\n{log}")
        self.log = log


def _listeners(data: Mapping[str, Any]) -> tuple[bool, ...]:
    """Is-TLS of each listener a configuration asks for (node.process.server.listener_ports)."""
    tls = data.get("tls", {})
    enabled = bool(tls.get("enabled", False))
    kinds = [False] if not enabled or tls.get("plain_listener", True) else []
    return (*kinds, True) if enabled else tuple(kinds)


def _spawn_serve(
    config_path: Path, log_path: Path, preexec_fn: Callable[[], None] | None = None
) -> tuple[subprocess.Popen, int]:
    """`pneumonode serve` logging to the end of `log_path`; returns it and that offset."""
    offset = log_path.stat().st_size if log_path.exists() else 0
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            node_command(config_path),
            cwd=config_path.parent,
            env=node_env(),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec_fn,
        )
    return process, offset


def start_node(
    workdir: Path,
    overrides: Mapping[str, Any] | None = None,
    *,
    preexec_fn: Callable[[], None] | None = None,
    startup_timeout: float = 30,
    log_name: str = "node.log",
) -> NodeProcess:
    """Start `pneumonode serve` on loopback and wait until it serves: its listeners bind
    port 0 (unless `overrides` name a port) and `node.port`/`node.tls_port` are the ports
    it logs; C-ECHO then works on the plain one.

    One serve process (`node.processes = 1`) unless `overrides` ask for more, and analysis
    off unless they turn it on, so these tests need no model.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    storage = workdir / "storage"
    base: dict[str, Any] = {
        "node": {"bind_address": "127.0.0.1", "port": 0, "processes": 1},
        "storage": {"folder": str(storage)},
        "analysis": {"enabled": False},
        "tls": {"port": 0},
    }
    for section, values in (overrides or {}).items():
        if isinstance(values, Mapping) and isinstance(base.get(section), dict):
            base[section] = {**base[section], **values}
        else:
            base[section] = values
    data = config_data(base)
    listeners = _listeners(data)
    if len(listeners) == 2 and data["node"]["processes"] != 1 and not base["tls"]["port"]:
        # The supervisor of several serve processes keys its sockets by configured port:
        # two listeners on port 0 would share one. The TLS one gets a port of its own.
        base["tls"]["port"] = data["tls"]["port"] = server_port()
    config_path = write_config(workdir / "config.toml", base)
    process, offset = _spawn_serve(config_path, workdir / log_name, preexec_fn)
    node = NodeProcess(
        host="127.0.0.1",
        port=int(data["node"]["port"]),
        ae_title=data["node"]["ae_title"],
        storage=Path(data["storage"]["folder"]),
        db_url=data["storage"]["database_url"] or f"sqlite:///{storage / 'index.sqlite'}",
        config_path=config_path,
        log_path=workdir / log_name,
        process=process,
        tls_port=int(data["tls"]["port"]) if True in listeners else None,
        listeners=listeners,
        log_offset=offset,
        logs_listening=True,
    )
    if not data["node"]["accept_unknown_callers"] and data.get("peers"):
        node.probe_ae = data["peers"][0]["ae_title"]
    wait_until_serving(node, startup_timeout)
    return node


def _write_ports(config_path: Path, port: int, tls_port: int | None) -> None:
    data = tomllib.loads(config_path.read_text(encoding="utf-8"))
    data.setdefault("node", {})["port"] = port
    if tls_port is not None:
        data.setdefault("tls", {})["port"] = tls_port
    config_path.write_text(dump_toml(data), encoding="utf-8")


def restart_node(node: NodeProcess, log_name: str = "node-restart.log") -> NodeProcess:
    """Start the same configuration again (after a stop or a kill) on the ports the node
    had, since peers and destinations may point at them; on port 0 if one of them was
    taken in the meantime."""
    log_path = node.config_path.parent / log_name
    plain = False in node.listeners
    _write_ports(node.config_path, node.port, node.tls_port)
    process, offset = _spawn_serve(node.config_path, log_path)
    again = dataclasses.replace(
        node, process=process, log_path=log_path, log_offset=offset, stopped=False
    )
    try:
        wait_until_serving(again, 30)
        return again
    except NodeExited as exc:
        if "Address already in use" not in exc.log:
            raise
    _write_ports(
        node.config_path, 0 if plain else node.port, 0 if node.tls_port is not None else None
    )
    process, offset = _spawn_serve(node.config_path, log_path)
    again = dataclasses.replace(again, process=process, log_offset=offset)
    wait_until_serving(again, 30)
    return again


def wait_until_serving(node: NodeProcess, timeout: float) -> None:
    """Wait for the node to log each of its listeners, recording the ports it bound (the
    line proves that this node, not some other process, holds the port); then, when it has
    a plain listener, for C-ECHO to work there. A node of an older revision on a known
    plain port (the benchmarks) needs only the C-ECHO."""
    deadline = time.monotonic() + timeout
    logged = [kind for kind in node.listeners if kind or node.logs_listening or not node.port]
    while True:
        if node.process.poll() is not None:
            raise NodeExited(node.process.returncode, node.run_log())
        bound = node.bound_ports()
        if all(kind in bound for kind in logged):
            break
        if time.monotonic() > deadline:
            node.process.kill()
            node.process.wait()
            raise RuntimeError(f"pneumonode did not listen in {timeout} s:\n{node.run_log()}")
        time.sleep(0.05)
    node.port = bound.get(False, node.port)
    node.tls_port = bound.get(True, node.tls_port)
    if False not in node.listeners:
        return
    while not echo(node.host, node.port, node.ae_title, calling=node.probe_ae, timeout=2):
        if node.process.poll() is not None:
            raise NodeExited(node.process.returncode, node.run_log())
        if time.monotonic() > deadline:
            node.process.kill()
            node.process.wait()
            raise RuntimeError(
                f"pneumonode did not answer C-ECHO in {timeout} s:\n{node.run_log()}"
            )
        time.sleep(0.2)


def storescu(
    node: NodeProcess, paths: list[Path], *extra: str, calling: str = "STORESCU", timeout=120
) -> subprocess.CompletedProcess:
    """Send `paths` (files or folders, recursively) over one association with `storescu -xy`."""
    return subprocess.run(
        [dcmtk("storescu"), "-xy", "-aet", calling, "-aec", node.ae_title, *extra]
        + [node.host, str(node.port), "+sd", "+r"]
        + [str(p) for p in paths],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wait_for_log(node: NodeProcess, text: str, timeout: float = 5, since: int = 0) -> str:
    """The node's log from offset `since`, once it contains `text` (log lines may trail the
    network reply); fails the test if `text` does not appear within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        log = node.log_text()[since:]
        if text in log:
            return log
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in the node's log after {timeout} s")
        time.sleep(0.05)


def c_find(
    node: NodeProcess, model: str, keys: Mapping[str, str], calling: str = "FINDTEST"
) -> tuple[int, list[Dataset]]:
    """A C-FIND over pynetdicom: the final status and the identifiers of the matches."""
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.add_requested_context(model)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    identifier = Dataset()
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    matches, final = [], None
    for status, answer in assoc.send_c_find(identifier, model):
        final = status.Status
        if status.Status in (0xFF00, 0xFF01):
            matches.append(answer)
    assoc.release()
    return final, matches
