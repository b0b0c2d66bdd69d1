"""Helpers shared by the tests: a real `pneumonode serve` process and the dcmtk programs.

The tests drive the node the way a user does: a config file, the console command in its
own process, and dcmtk or pynetdicom clients over TCP on a free loopback port.
"""

from __future__ import annotations

import contextlib
import os
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
from typing import Any

from pydicom import Dataset, dcmread
from sqlalchemy import Connection, create_engine, func, select

from storage.models import Instance

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULTS_TOML = REPO_ROOT / "node" / "defaults.toml"

# dcmtk waits ~40 ms per message with Nagle's algorithm unless told otherwise.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


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
    """The 200 SIIM files: ../shared/data/siim_small next to the repo, or $PNEUMONODE_SIIM_DIR."""
    override = os.environ.get("PNEUMONODE_SIIM_DIR")
    return Path(override) if override else REPO_ROOT.parent / "shared" / "data" / "siim_small"


def siim_files() -> list[Path]:
    return sorted((siim_dir() / "train").rglob("*.dcm"))


def dcmtk(program: str) -> str:
    """Absolute path of a dcmtk program; the venv's pynetdicom apps share some names."""
    venv_bin = Path(sys.executable).parent.resolve()
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    search = [d for d in dirs if Path(d).resolve() != venv_bin] + ["/usr/bin", "/usr/local/bin"]
    found = shutil.which(program, path=os.pathsep.join(search))
    if found is None:
        raise RuntimeError(f"dcmtk program {program!r} not found (apt install dcmtk)")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    """True when a C-ECHO with dcmtk's echoscu succeeds."""
    result = subprocess.run(
        [dcmtk("echoscu"), "-aet", calling, "-aec", ae_title, "-to", str(timeout)]
        + [host, str(port)],
        env=DCMTK_ENV,
        capture_output=True,
        timeout=timeout + 10,
    )
    return result.returncode == 0


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

    @property
    def db_path(self) -> Path:
        return self.storage / "index.sqlite"

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

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


def start_node(
    workdir: Path,
    overrides: Mapping[str, Any] | None = None,
    *,
    preexec_fn: Callable[[], None] | None = None,
    startup_timeout: float = 30,
    log_name: str = "node.log",
    ready_log: str | None = None,
) -> NodeProcess:
    """Start `pneumonode serve` on a free loopback port and wait until C-ECHO works (or,
    with `ready_log`, until the log holds that text).

    Analysis is off unless `overrides` turns it on, so these tests need no model.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    storage = workdir / "storage"
    base: dict[str, Any] = {
        "node": {"bind_address": "127.0.0.1", "port": port},
        "storage": {"folder": str(storage)},
        "analysis": {"enabled": False},
    }
    for section, values in (overrides or {}).items():
        if isinstance(values, Mapping) and isinstance(base.get(section), dict):
            base[section] = {**base[section], **values}
        else:
            base[section] = values
    config_path = write_config(workdir / "config.toml", base)
    data = config_data(base)
    log_path = workdir / log_name
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            node_command(config_path),
            cwd=workdir,
            env=node_env(),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec_fn,
        )
    node = NodeProcess(
        host="127.0.0.1",
        port=int(data["node"]["port"]),
        ae_title=data["node"]["ae_title"],
        storage=Path(data["storage"]["folder"]),
        db_url=data["storage"]["database_url"] or f"sqlite:///{storage / 'index.sqlite'}",
        config_path=config_path,
        log_path=log_path,
        process=process,
    )
    if not data["node"]["accept_unknown_callers"] and data.get("peers"):
        node.probe_ae = data["peers"][0]["ae_title"]
    if ready_log is None:
        wait_until_serving(node, startup_timeout)
    else:  # no plain listener to echo: wait for the log to say it listens
        wait_for_log(node, ready_log, timeout=startup_timeout)
    return node


def restart_node(node: NodeProcess, log_name: str = "node-restart.log") -> NodeProcess:
    """Start the same configuration again (after a stop or a kill)."""
    log_path = node.config_path.parent / log_name
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            node_command(node.config_path),
            cwd=node.config_path.parent,
            env=node_env(),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    again = NodeProcess(
        host=node.host,
        port=node.port,
        ae_title=node.ae_title,
        storage=node.storage,
        db_url=node.db_url,
        config_path=node.config_path,
        log_path=log_path,
        process=process,
        probe_ae=node.probe_ae,
    )
    wait_until_serving(again, 30)
    return again


def wait_until_serving(node: NodeProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.process.poll() is not None:
            raise RuntimeError(
                f"pneumonode exited with {node.process.returncode}:\n{node.log_text()}"
            )
        if echo(node.host, node.port, node.ae_title, calling=node.probe_ae, timeout=2):
            return
        time.sleep(0.2)
    node.process.kill()
    raise RuntimeError(f"pneumonode did not answer C-ECHO in {timeout} s:\n{node.log_text()}")


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
    """dcmtk storescp on a fixed port, stoppable and restartable; one file per instance
    received (`+uf` unique names), so a duplicate delivery shows up as a second file; it
    accepts every transfer syntax (`+xa`), as a PACS would, unless `options` say otherwise
    (`+xi`: Implicit VR Little Endian only; `+B`: write the received dataset bit for bit)."""

    def __init__(
        self, folder: Path, ae_title: str = "STORESCP", options: tuple[str, ...] = ("+xa",)
    ) -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.options = options
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 10) -> None:
        self.process = subprocess.Popen(
            [
                dcmtk("storescp"),
                *self.options,
                "-aet",
                self.ae_title,
                "+uf",
                "-od",
                str(self.folder),
                str(self.port),
            ],
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while not echo("127.0.0.1", self.port, self.ae_title, timeout=2):
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"storescp did not answer C-ECHO on port {self.port}")
            time.sleep(0.05)

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
