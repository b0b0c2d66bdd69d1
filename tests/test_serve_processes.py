"""Several serve processes on one port: connections spread, limits node-wide, no orphans.

`node.processes = 2` starts two serve processes accepting on the supervisor's socket. The
association limits are the node's, counted across both; a serve process that dies is
restarted with its slots freed, and `kill -9` of the supervisor takes its serve processes
(and its analysis worker, and that worker's result processes) with it, so a restart finds
the port free and nobody else writing or claiming jobs.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path

from analysis_support import analysing_alone, wait_for
from pynetdicom import AE

from node.testing.dcmtk import echo
from node.testing.node_process import restart_node, start_node, wait_for_log
from node.testing.samples import DX, small_image

HOSTILE_ADDRESS = "127.0.0.2"
IMAGES_TO_ANALYSE = 40


def _processes() -> dict[int, tuple[int, bytes]]:
    """{PID: (its parent's PID, its command line)} of every process."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        found[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmdline)
    return found


def _spawned_children(parent_pid: int) -> list[int]:
    """PIDs of the children `parent_pid` started with multiprocessing's spawn (serve
    processes, an analysis worker, result processes: children whose name says so)."""
    return [
        pid
        for pid, (parent, cmdline) in _processes().items()
        if parent == parent_pid and b"spawn_main" in cmdline
    ]


def _descendants(root: int) -> set[int]:
    """PIDs of every process below `root` (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _cmdline) in _processes().items():
        children.setdefault(parent, []).append(pid)
    found: set[int] = set()
    pending = [root]
    while pending:
        for child in children.get(pending.pop(), []):
            if child not in found:
                found.add(child)
                pending.append(child)
    return found


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its reaper does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _start(workdir: Path, node_settings: dict, **sections):
    node = start_node(workdir, {"node": {"processes": 2, **node_settings}, **sections})
    wait_for_log(node, "in 2 serve processes", timeout=60)
    return node


def _associate(node, calling: str = "SPREAD", address: str = "127.0.0.1"):
    ae = AE(ae_title=calling)
    ae.add_requested_context(DX)
    return ae.associate(node.host, node.port, ae_title=node.ae_title, bind_address=(address, 0))


def _associate_when_free(node, calling: str, address: str, timeout: float = 15):
    """An association as soon as the node has a slot for `address` again."""
    deadline = time.monotonic() + timeout
    while True:
        assoc = _associate(node, calling, address)
        if assoc.is_established or time.monotonic() > deadline:
            assert assoc.is_established, f"no slot for {address} within {timeout} s"
            return assoc
        time.sleep(0.2)


def test_associations_spread_evenly_over_the_serve_processes(tmp_path: Path) -> None:
    """Each new connection goes to the serve process that holds fewer (node.dicom.slots):
    eight associations opened one after another are four in each process, where the first
    process to wake would otherwise take each (often three of four senders in one)."""
    node = _start(tmp_path / "spread", {})
    try:
        # start_node's C-ECHO holds its slot until its thread ends, just after this line.
        wait_for_log(node, "association released", timeout=10)
        time.sleep(0.5)
        held = [_associate(node) for _ in range(8)]
        assert all(a.is_established for a in held)
        for assoc in held:
            assert assoc.send_c_store(small_image()).Status == 0x0000
            assoc.release()
        tags = re.findall(
            r"\[serve (\d)\]: association accepted: calling AE 'SPREAD'", node.log_text()
        )
        assert sorted(tags) == ["1"] * 4 + ["2"] * 4
    finally:
        assert node.stop() == 0


def test_the_address_limit_holds_across_processes(tmp_path: Path) -> None:
    node = _start(tmp_path / "share", {"max_associations": 6, "max_associations_per_address": 2})
    try:
        held = [_associate(node, "GREEDY", HOSTILE_ADDRESS) for _ in range(4)]
        assert [a.is_established for a in held] == [True, True, False, False]
        assert echo(node.host, node.port, node.ae_title)  # another address still gets in
        for assoc in held:
            if assoc.is_established:
                assoc.release()
        # Both released slots are free again (once the associations' threads have ended:
        # a release is not the end of the thread, so each is waited for), whichever
        # process held them: the address holds two at once again.
        again = [_associate_when_free(node, "GREEDY", HOSTILE_ADDRESS) for _ in range(2)]
        for assoc in again:
            assoc.release()
    finally:
        assert node.stop() == 0


def test_the_node_limit_holds_across_processes(tmp_path: Path) -> None:
    # No [[peers]]: unknown callers may take every slot (none is kept for peers).
    node = _start(
        tmp_path / "full", {"max_associations": 3, "max_associations_per_address": 3}, peers=[]
    )
    try:
        held = [_associate(node, "FILLER", f"127.0.0.{n}") for n in (2, 3, 4)]
        assert all(a.is_established for a in held)
        extra = _associate(node, "LATE", "127.0.0.5")
        assert not extra.is_established
        assert extra.is_rejected
        wait_for_log(node, "association rejected: the node holds node.max_associations")
        held[0].release()
        _associate_when_free(node, "LATE", "127.0.0.5").release()
        for assoc in held[1:]:
            assoc.release()
    finally:
        assert node.stop() == 0


def test_a_dead_serve_process_is_replaced_and_its_slots_freed(tmp_path: Path) -> None:
    node = _start(tmp_path / "replace", {"max_associations": 4, "max_associations_per_address": 2})
    try:
        held = [_associate(node, "HOLDER", HOSTILE_ADDRESS) for _ in range(2)]
        assert all(a.is_established for a in held)
        for pid in _spawned_children(node.process.pid):
            os.kill(pid, signal.SIGKILL)
        wait_for(
            lambda: node.log_text().count("restarting it") >= 2, 30, "both serve processes back"
        )
        wait_for(lambda: echo(node.host, node.port, node.ae_title), 30, "C-ECHO again")
        # The killed processes' slots were cleared: the address may hold two again.
        again = [_associate_when_free(node, "HOLDER", HOSTILE_ADDRESS) for _ in range(2)]
        for assoc in again:
            assoc.release()
    finally:
        assert node.stop() == 0


def test_kill_9_of_serve_leaves_no_serve_process_behind(tmp_path: Path) -> None:
    node = _start(tmp_path / "orphans", {})
    children = _spawned_children(node.process.pid)
    assert len(children) == 2
    node.kill()

    def gone() -> bool:
        return not any(Path(f"/proc/{pid}").exists() for pid in children)

    wait_for(gone, 10, "the serve processes to die with their supervisor")
    with socket.socket() as probe:  # nobody listens on the port any more
        assert probe.connect_ex((node.host, node.port)) != 0
    again = restart_node(node)
    try:
        assert echo(again.host, again.port, again.ae_title)
    finally:
        assert again.stop() == 0


def test_kill_9_of_serve_leaves_no_child_process_behind(tmp_path: Path) -> None:
    """Every child dies with `serve`: the serve processes, the analysis worker, and the
    worker's result process (whose parent is the worker, not `serve`)."""
    analysis = analysing_alone(
        tmp_path / "no-model", demo_model=False, result_processes=1, worker_processes=1
    )
    node = start_node(tmp_path / "family", {"node": {"processes": 2}, **analysis})
    try:
        wait_for_log(node, "in 2 serve processes", timeout=60)
        wait_for_log(node, "results built by 1 processes", timeout=120)
        children = _spawned_children(node.process.pid)  # two serve processes, the worker
        result_processes = [p for child in children for p in _spawned_children(child)]
        assert (len(children), len(result_processes)) == (3, 1)
        family = _descendants(node.process.pid)  # with any helper process of multiprocessing
    finally:
        node.kill()

    def gone() -> bool:
        return not any(_alive(pid) for pid in family)

    wait_for(gone, 30, "every child process to die with serve")


def test_kill_9_of_serve_while_analysing_leaves_no_child_process_behind(tmp_path: Path) -> None:
    """As above, but with the demo model analysing images as `serve` is killed (issue 19:
    the worker and its result process went on analysing for a dead node)."""
    analysis = analysing_alone(tmp_path / "no-model", result_processes=1, worker_processes=1)
    node = start_node(tmp_path / "busy", {"node": {"processes": 2}, **analysis})
    family: set[int] = set()
    try:
        wait_for_log(node, "in 2 serve processes", timeout=60)
        assoc = _associate(node, "MODALITY")
        assert assoc.is_established
        for _ in range(IMAGES_TO_ANALYSE):
            assert assoc.send_c_store(small_image()).Status == 0x0000
        assoc.release()
        wait_for_log(node, "analysed SOP", timeout=240)  # killed while the rest wait
        children = _spawned_children(node.process.pid)
        result_processes = [p for child in children for p in _spawned_children(child)]
        assert (len(children), len(result_processes)) == (3, 1)
        family = _descendants(node.process.pid)
    finally:
        node.kill()

    def gone() -> bool:
        return not any(_alive(pid) for pid in family)

    wait_for(gone, 30, "every child process to die with serve while analysing")
    analysed = node.log_text().count("analysed SOP")
    time.sleep(3)
    assert node.log_text().count("analysed SOP") == analysed, "nobody analyses for a dead node"
