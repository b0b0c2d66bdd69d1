"""Helpers shared by the tests: a real `pneumonode serve` process and the dcmtk programs.

The tests drive the node the way a user does: a config file, the console command in its
own process, and dcmtk or pynetdicom clients over TCP on loopback.

Ports: a port chosen by one process and bound later by another can be taken in between,
most often as the ephemeral port of some outgoing connection. So the node binds port 0
and the tests read the port it logs; servers that cannot bind 0 themselves (storescp,
Orthanc) get a port outside the kernel's ephemeral range (`server_port`), which no
outgoing connection is given, and their starts retry on a new port when they lose it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pydicom import Dataset, dcmread
from sqlalchemy import Connection, create_engine, func, select

from storage.models import Instance

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULTS_TOML = REPO_ROOT / "node" / "defaults.toml"

# dcmtk waits ~40 ms per message with Nagle's algorithm unless told otherwise.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}

# How far a probability may move between two runs of the same model on the same image in
# different processes: the worker and `predict` batch images differently and run with
# different thread counts, and float32 convolutions then differ in the last bits (the 7th
# significant digit on some CPUs). PyTorch promises no bit-equality across batch sizes,
# thread counts or CPUs, so results are compared to this, not to the bit.
PROBABILITY_TOLERANCE = 1e-5

# Starts of a server on a port it cannot choose itself, before the test gives up.
SERVER_START_TRIES = 5
# A server restarted on the port its peers know (a destination coming back) tries that
# port this often, a second apart.
SAME_PORT_TRIES = 5


@contextlib.contextmanager
def index_connection(db_url: str) -> Iterator[Connection]:
    """A connection to a node's index, opened from outside the node, closed after use."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


def stored_path(node: NodeProcess, sop_instance_uid: str) -> Path:
    """Where the node keeps an instance, as its index says."""
    with index_connection(node.db_url) as conn:
        relative = conn.scalar(
            select(Instance.file_path).where(Instance.sop_instance_uid == sop_instance_uid)
        )
    assert relative is not None, f"{sop_instance_uid} is not in the index"
    return node.storage / "files" / relative


def count_instances(db_url: str) -> int:
    with index_connection(db_url) as conn:
        return int(conn.scalar(select(func.count()).select_from(Instance)))


def assert_same_patient_and_study(written: Dataset, source: Dataset) -> None:
    """A result object must file under the source's patient and study."""
    for keyword in (
        "PatientID",
        "PatientName",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
    ):
        assert written.get(keyword) == source.get(keyword), keyword


def siim_dir() -> Path:
    """The 200 SIIM files: ../shared/data/siim_small next to the repo, or $PNEUMONODE_SIIM_DIR
    (for example a folder written by `pneumonode sample-data DIR`: DIR/train/**/*.dcm and
    DIR/labels.csv)."""
    override = os.environ.get("PNEUMONODE_SIIM_DIR")
    return Path(override) if override else REPO_ROOT.parent / "shared" / "data" / "siim_small"


def siim_missing_reason() -> str | None:
    """Why the SIIM sample cannot be used here, or None when it can: a clone without
    ../shared beside it has none, and its tests skip with this reason instead of failing."""
    path = siim_dir()
    if not (path / "train").is_dir() or next((path / "train").rglob("*.dcm"), None) is None:
        return (
            f"SIIM sample not found at {path}; run `pneumonode sample-data DIR` "
            "and set PNEUMONODE_SIIM_DIR=DIR"
        )
    return None


def require_siim() -> Path:
    """The SIIM folder; skips the calling test (or fixture's users) when there is none."""
    reason = siim_missing_reason()
    if reason is not None:
        pytest.skip(reason)
    return siim_dir()


def siim_files() -> list[Path]:
    """Every SIIM DICOM file, sorted; skips the calling test when the sample is missing."""
    return sorted((require_siim() / "train").rglob("*.dcm"))


def siim_file(relative: str) -> Path:
    """One SIIM file by its path under the sample folder; skips when it is missing."""
    path = require_siim() / relative
    if not path.is_file():
        pytest.skip(f"{path} is not in the SIIM sample")
    return path


def dcmtk(program: str) -> str:
    """Absolute path of a dcmtk program; the venv's pynetdicom apps share some names."""
    venv_bin = Path(sys.executable).parent.resolve()
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    search = [d for d in dirs if Path(d).resolve() != venv_bin] + ["/usr/bin", "/usr/local/bin"]
    found = shutil.which(program, path=os.pathsep.join(search))
    if found is None:
        raise RuntimeError(f"dcmtk program {program!r} not found (apt install dcmtk)")
    return found


def ephemeral_port_range() -> tuple[int, int]:
    """The ports the kernel hands to outgoing connections (and to binds of port 0)."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text(encoding="ascii")
        low, high = (int(part) for part in text.split())
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
    return low, high


SERVER_PORT_FLOOR = 10000
_random = random.SystemRandom()  # independent of any seeding a test does
_handed_out: set[int] = set()


def _bindable(port: int) -> bool:
    """Nothing holds `port` on any address (servers such as storescp bind them all)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


# The node's documented ports (DICOM, DICOM TLS), which tests/test_readme.py uses as written.
NODE_DEFAULT_PORTS = frozenset({11112, 2762})


def server_port() -> int:
    """A port for a server that cannot bind port 0 itself: free now, and outside the
    ephemeral range, so no outgoing connection can take it before the server binds it.
    Only another server can, and the starters below then retry on a new port. Never the
    same port twice in this test process, so a port handed out for a server that is not
    running yet (or on purpose for nobody) stays its own."""
    low, high = ephemeral_port_range()
    # Above the ports services and these tests name (104, 4242, 5432, 8042...) where the
    # range leaves room for it.
    floor = SERVER_PORT_FLOOR if low - SERVER_PORT_FLOOR >= 1000 else 1025
    ranges = [r for r in (range(floor, low), range(high + 1, 65536)) if len(r)]
    if not ranges:  # the ephemeral range covers every port: a free one is all there is
        ranges = [range(1025, 65536)]
    total = sum(len(r) for r in ranges)
    for _ in range(1000):
        index = _random.randrange(total)
        for candidates in ranges:
            if index < len(candidates):
                port = candidates[index]
                break
            index -= len(candidates)
        if port not in _handed_out and port not in NODE_DEFAULT_PORTS and _bindable(port):
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free port outside the ephemeral range {low}-{high}")


def free_port() -> int:
    """The benchmarks' name for `server_port` (bench/ scripts give it to the servers they
    start); the tests let servers bind port 0 or call `server_port` themselves."""
    return server_port()


class ServerDidNotStart(RuntimeError):
    """A server process exited or did not answer on the port it was given."""


def start_on_server_port(
    start: Callable[[int], T], what: str, tries: int = SERVER_START_TRIES
) -> T:
    """`start(port)` on a fresh `server_port()` until one start succeeds: another process
    may take a port between the check and the server's bind, so one lost race is not a
    failure. `start` raises ServerDidNotStart (having stopped its process) when it lost."""
    failures: list[str] = []
    for _ in range(tries):
        try:
            return start(server_port())
        except ServerDidNotStart as exc:
            failures.append(str(exc))
    raise RuntimeError(f"{what} did not start in {tries} tries:\n" + "\n".join(failures))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        text = str(value).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{text}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def dump_toml(data: Mapping[str, Any]) -> str:
    """TOML text for the config's shape: tables of scalars/lists, and [[peers]]; an empty
    peers list is written `peers = []` (no peers), as leaving it out keeps the default's."""
    lines: list[str] = [f"{name} = []" for name, table in data.items() if table == []]
    for name, table in data.items():
        if isinstance(table, list):
            for item in table:
                lines.append(f"[[{name}]]")
                lines.extend(f"{k} = {_toml_value(v)}" for k, v in item.items())
                lines.append("")
            continue
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
        lines.append("")
    return "\n".join(lines)


def config_data(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The shipped defaults with `overrides` ({section: {key: value}}, or "peers": [...])
    applied; a value of None removes the key (it then takes its embedded default)."""
    data = tomllib.loads(DEFAULTS_TOML.read_text(encoding="utf-8"))
    for section, values in (overrides or {}).items():
        if section == "peers" or not isinstance(values, Mapping):
            data[section] = values
            continue
        table = data.setdefault(section, {})
        for key, value in values.items():
            if value is None:
                table.pop(key, None)
            else:
                table[key] = value
    return data


def write_config(path: Path, overrides: Mapping[str, Any] | None = None) -> Path:
    path.write_text(dump_toml(config_data(overrides)), encoding="utf-8")
    return path


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
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


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


# The line `serve` logs for each listener (node/process/server.py, and the supervisor of
# several serve processes): the port it bound, which is how a test learns it.
LISTENING = re.compile(r"listening as .+? on (?P<host>\S+):(?P<port>\d+)(?P<tls> with DICOM TLS)?")


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
