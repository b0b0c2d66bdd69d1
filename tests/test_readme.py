"""The README works as written: every ```sh block runs, in order, as a user would type it,
in a folder laid out like the checkout (its `.venv`, its `config.toml`), with the sample data
taken from the local SIIM copy instead of the internet ($PNEUMONODE_SAMPLE_DATA, which
`sample-data` honours). Long-running blocks (serve, storescp, Orthanc) run in the background
as the README's other shells; checks after some blocks wait for what the README says
happens next (results in `received/`, in Orthanc). The README uses the node's real default
ports, so the test skips, naming them, when another program holds one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from readme_blocks import Block, readme_blocks
from support import REPO_ROOT, require_siim

from node.testing.samples import siim_dir

pytestmark = pytest.mark.slow

README_PORTS = (11112, 4242, 2762, 8042)  # node, ORTHANC's storescp/Orthanc, TLS, Orthanc HTTP
BLOCK_TIMEOUT = 900  # the shortened training runs are the longest blocks
START_TIMEOUT = 90


@dataclass
class Background:
    block: Block
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> int:
        """Ctrl-C in its shell (SIGINT to the process group)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            raise


def _as_in_a_terminal() -> None:
    """Ctrl-C as in the user's shell: a test run started in the background (CI, `cmd &`)
    inherits SIGINT and SIGQUIT ignored, and an ignored signal stays ignored across exec, so
    storescp would not stop on the Ctrl-C the README asks for."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.5)


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A folder the README's relative paths work in: the venv and config.toml of the repo."""
    require_siim()
    busy = [port for port in README_PORTS if _port_in_use(port)]
    if busy:
        pytest.skip(f"the README's ports {busy} are held by another program")
    (tmp_path / ".venv").symlink_to(REPO_ROOT / ".venv")
    shutil.copy(REPO_ROOT / "config.toml", tmp_path / "config.toml")
    return tmp_path


def _environment(folder: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PNEUMONODE_")}
    env["PNEUMONODE_SAMPLE_DATA"] = str(siim_dir())
    env["HOME"] = str(folder / "home")  # the decoded-image cache of train lands in there
    return env


class Shells:
    """The user's shells: one per background program, one for everything else."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.env = _environment(folder)
        self.running: list[Background] = []
        self._stopped: list[str] = []  # the output of programs stopped on the way
        self._started = 0

    def run(self, block: Block) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", block.command()],
            cwd=self.folder, env=self.env, capture_output=True, text=True,
            timeout=BLOCK_TIMEOUT,
        )

    def start(self, block: Block) -> Background:
        self._started += 1
        log = self.folder / f"background-{self._started}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                ["bash", "-e", "-c", block.command()],
                cwd=self.folder, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_as_in_a_terminal,
            )
        started = Background(block, process, log)
        self.running.append(started)
        wanted = block.background or ""
        if wanted.startswith("port "):
            ready = lambda: _accepts(int(wanted.split()[1]))  # noqa: E731
        else:
            ready = lambda: wanted in started.output()  # noqa: E731

        def up() -> bool:
            assert process.poll() is None, f"{block.name} exited:\n{started.output()[-3000:]}"
            return ready()

        _wait(up, START_TIMEOUT, f"{block.name} ready")
        return started

    def stopped_logs(self) -> str:
        return "\n".join(self._stopped)

    def stop(self, command: str) -> None:
        matches = [b for b in self.running if b.block.text.strip() == command] or [
            b for b in self.running if command in b.block.text
        ]
        assert matches, f"no background block {command!r} to stop"
        for background in matches:
            code = background.stop()
            assert code in (0, 130, -signal.SIGINT), f"{command} exited {code}"
            self.running.remove(background)
            self._stopped.append(background.output())

    def stop_all(self) -> list[str]:
        problems = []
        for background in reversed(self.running):
            code = background.stop()
            if code not in (0, 130, -signal.SIGINT):
                problems.append(f"{background.block.name} exited {code}")
        self.running.clear()
        return problems

    def serve_log(self) -> str:
        return "\n".join(b.output() for b in self.running if "pneumonode serve" in b.block.text)


def _orthanc(path: str) -> object:
    with urllib.request.urlopen(f"http://127.0.0.1:8042{path}", timeout=10) as response:
        return json.loads(response.read())


def _check_after(block: Block, result: subprocess.CompletedProcess, shells: Shells) -> None:
    """What the README says happens after this block."""
    folder = shells.folder
    text = block.text
    if "-aet ORTHANC -aec PNEUMONODE" in text:  # one image sent as the peer ORTHANC
        # storescp names files by modality: SC.<uid>, SRc.<uid> (a Comprehensive SR)
        _wait(lambda: {p.name[:2] for p in (folder / "received").iterdir()} >= {"SC", "SR"},
              180, "the SC and SR in received/")
    if "findscu" in text:
        assert "Find Response" in result.stderr
    if "getscu" in text and "retrieved" in text:
        got = folder / ("retrieved-patient" if "retrieved-patient" in text else "retrieved")
        assert len(list(got.iterdir())) >= 3, "the image, its SC and its SR"
    if text.startswith(".venv/bin/pneumonode status"):
        assert "analysis model:" in result.stdout
    if "pneumonode train --data data/siim_small --out models/pneumothorax" in text:
        _wait(lambda: "models/pneumothorax" in shells.serve_log(), 120,
              "the node loading the trained model")
    if "modalities/pneumonode/store" in text:  # Orthanc's image comes back with its results
        _wait(lambda: len(_orthanc("/instances")) >= 3, 180, "the SC and SR in Orthanc")
    if "/retrieve" in text:
        assert len(_orthanc("/studies")) >= 2


@pytest.fixture
def shells(checkout: Path) -> Iterator[Shells]:
    running = Shells(checkout)
    try:
        yield running
    finally:
        problems = running.stop_all()
        assert not problems, problems


def test_every_readme_block_runs_as_written(shells: Shells) -> None:
    blocks = readme_blocks(REPO_ROOT / "README.md")
    assert len(blocks) >= 20
    ran = 0
    for block in blocks:
        if block.skip is not None:
            continue
        for command in block.stop:
            shells.stop(command)
        if block.background is not None:
            shells.start(block)
        else:
            result = shells.run(block)
            assert result.returncode == 0, (
                f"{block.name} exited {result.returncode}:\n{result.stdout[-3000:]}\n"
                f"{result.stderr[-3000:]}"
            )
            _check_after(block, result, shells)
        ran += 1
    log = shells.serve_log() + shells.stopped_logs()
    assert "Traceback" not in log, log[-5000:]
    assert ran >= 20
