"""`serve`: the node in this process, or as several processes accepting on one port, so
parallel associations use every core.

pynetdicom runs each association in a thread of one interpreter: four senders at once go no
faster than one. Here the supervising `serve` process binds the listening socket(s), runs
the recovery pass, and starts `node.processes` serve processes (spawned, each its own
interpreter) that accept on those same sockets; the kernel hands each new connection to
one of them. The supervisor keeps the background services (the result sender, the analysis
workers) and restarts a serve process that dies. The association limits stay node-wide:
the processes count in shared memory (`node.dicom.slots`), and a dead process's slots are
cleared. A serve process dies with its supervisor (node.process.supervision), so `kill -9`
of `serve` leaves no process behind still holding the port or writing files.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from multiprocessing.queues import SimpleQueue

from node.config import Config
from node.context import NodeContext, build_context
from node.dicom.slots import AssociationSlots
from node.metrics.multiprocess import process_died
from node.metrics.service import NodeMetrics
from node.process.logs import configure_logging, quiet_pynetdicom
from node.process.server import (
    SHUTDOWN_GRACE_SECONDS,
    BackgroundServices,
    DicomNode,
    ServiceFactory,
    listener_ports,
    node_slots,
    recover_storage,
)
from node.process.start_checks import StartError, check_start
from node.process.supervision import run_until_signalled, tie_to_parent
from storage.consistency import RecoveryReport, log_recovery
from storage.migrations import IndexVersionError

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 128
READY_TIMEOUT_SECONDS = 60.0
RESTART_DELAY_SECONDS = 1.0
# A serve process that dies this many times in a row before it accepts is not restarted
# again: the node stops with its reason (a restart would only fail the same way).
MAX_START_FAILURES = 3
EXIT_START_FAILED = 5
# A process killed mid-write may still hold the writer lock for a moment after a restart.
RECOVERY_LOCK_WAIT_SECONDS = 5.0


def _serve_process_main(
    config: Config,
    sockets: dict[int, socket.socket],
    slots: AssociationSlots,
    number: int,
    ready: threading.Event,
    log_level: int,
    parent_pid: int,
    start_failures: SimpleQueue | None = None,
) -> None:
    """Entry point of one serve process (a fresh interpreter: spawn).

    A start that fails is one line on `start_failures` (the supervisor counts them and
    stops the node after a few in a row) and exit status EXIT_START_FAILED."""
    tie_to_parent(parent_pid)
    configure_logging(logging.getLevelName(log_level), process_tag=f"serve {number + 1}")
    try:
        node = DicomNode(
            config,
            slots=slots.for_process(number),
            listening_sockets=sockets,
            recover_at_start=False,
        )
    except Exception as exc:
        _report_start_failure(number, exc, start_failures)
        raise SystemExit(EXIT_START_FAILED) from None

    def start() -> None:
        node.start()
        # Ctrl-C reaches the whole process group: the supervisor stops this process.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        ready.set()

    try:
        code = run_until_signalled(start, node.stop, what=f"serve process {number + 1}")
    except Exception as exc:
        _report_start_failure(number, exc, start_failures)
        raise SystemExit(EXIT_START_FAILED) from None
    raise SystemExit(code)


def _report_start_failure(
    number: int, exc: BaseException, start_failures: SimpleQueue | None
) -> None:
    reason = start_failure_reason(exc)
    log.debug("serve process %d could not start", number + 1, exc_info=exc)
    log.error("serve process %d could not start: %s", number + 1, reason)
    if start_failures is not None:
        start_failures.put((number, reason))


def start_failure_reason(exc: BaseException) -> str:
    """One line for a start that failed: a StartError's own line, else the error's type
    and first line (the traceback is logged at DEBUG)."""
    if isinstance(exc, StartError):
        return str(exc)
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(LISTEN_BACKLOG)
    return sock


def recover_when_quiet(context: NodeContext) -> RecoveryReport:
    """The recovery pass, waiting briefly for processes of a killed node to be gone."""
    deadline = time.monotonic() + RECOVERY_LOCK_WAIT_SECONDS
    while True:
        report = recover_storage(context)
        if not report.skipped or time.monotonic() >= deadline:
            return report
        time.sleep(0.2)


class ServeProcesses:
    """The supervisor: listening sockets, serve processes, background services."""

    # What each serve process runs (a module-level function: spawn pickles it by name).
    process_main = staticmethod(_serve_process_main)

    def __init__(self, config: Config, services: Sequence[ServiceFactory], processes: int) -> None:
        quiet_pynetdicom()  # the result sender runs here
        self.config = config
        self.count = processes
        self._services = BackgroundServices(services)
        self._spawn_context = multiprocessing.get_context("spawn")
        self._processes: list[multiprocessing.process.BaseProcess | None] = [None] * processes
        self._readies: list[threading.Event | None] = [None] * processes
        self._sockets: dict[int, socket.socket] = {}
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None
        # Set by the monitor when serve processes keep failing to start; `serve` stops.
        self.stop_requested = threading.Event()
        self.failure: str | None = None
        self._start_failures: SimpleQueue = self._spawn_context.SimpleQueue()
        self._failed_starts = [0] * processes
        self._reasons: dict[int, str] = {}
        self.slots = node_slots(config, processes)
        self.context: NodeContext | None = None

    def _spawn(self, number: int) -> threading.Event:
        ready = self._spawn_context.Event()
        process = self._spawn_context.Process(
            target=self.process_main,
            args=(
                self.config,
                self._sockets,
                self.slots,
                number,
                ready,
                logging.getLogger().getEffectiveLevel(),
                os.getpid(),
                self._start_failures,
            ),
            name=f"pneumonode-serve-{number + 1}",
        )
        process.start()
        self._processes[number] = process
        # Kept until replaced: a collected Event unlinks its semaphore before the child
        # has opened it.
        self._readies[number] = ready
        return ready

    def start(self) -> None:
        self.context = build_context(self.config)
        log_recovery(recover_when_quiet(self.context))
        for port, _is_tls in listener_ports(self.config):
            self._sockets[port] = _listening_socket(self.config.node.bind_address, port)
        readies = [self._spawn(number) for number in range(self.count)]
        self._monitor = threading.Thread(target=self._watch, name="serve-monitor", daemon=True)
        self._monitor.start()
        self._wait_until_ready(readies)
        for port, is_tls in listener_ports(self.config):
            host, real_port = self._sockets[port].getsockname()[:2]
            log.info(
                "listening as %s on %s:%d%s in %d serve processes (storage %s)",
                self.config.node.ae_title,
                host,
                real_port,
                " with DICOM TLS" if is_tls else "",
                self.count,
                self.config.storage.folder,
            )
        self._services.start(self.context)

    def _wait_until_ready(self, readies: list[threading.Event]) -> None:
        """Wait (boundedly) for the first serve processes to accept; one that died while
        starting is the monitor's to restart, not a reason to wait on."""
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        pending = dict(enumerate(readies))
        while pending and time.monotonic() < deadline and not self._stopping.is_set():
            for number, ready in list(pending.items()):
                process = self._processes[number]
                if ready.is_set() or process is None or not process.is_alive():
                    del pending[number]
            time.sleep(0.05)
        for number in pending:
            log.error("serve process %d did not start in time", number + 1)

    def _watch(self) -> None:
        """Restart a serve process that died, after clearing the slots it held; stop the
        node when one failed to start MAX_START_FAILURES times in a row."""
        while not self._stopping.wait(0.5):
            for number, process in enumerate(self._processes):
                if process is None or process.is_alive() or self._stopping.is_set():
                    continue
                self.slots.clear_row(number)
                process_died(process.pid)
                if self._count_failed_start(number):
                    return
                log.error(
                    "serve process %d exited with %s; restarting it",
                    number + 1,
                    process.exitcode,
                )
                if self._stopping.wait(RESTART_DELAY_SECONDS):
                    return
                self._spawn(number)

    def _count_failed_start(self, number: int) -> bool:
        """Count a death before ready as a failed start; True when the node must stop."""
        while not self._start_failures.empty():
            failed, reason = self._start_failures.get()
            self._reasons[failed] = reason
        ready = self._readies[number]
        if ready is not None and ready.is_set():
            self._failed_starts[number] = 0
            return False
        self._failed_starts[number] += 1
        if self._failed_starts[number] < MAX_START_FAILURES:
            return False
        process = self._processes[number]
        exitcode = process.exitcode if process is not None else None
        reason = self._reasons.get(number, f"it exited with {exitcode} before accepting")
        self.failure = (
            f"serve process {number + 1} failed to start {MAX_START_FAILURES} times "
            f"in a row, last: {reason}"
        )
        log.error("stopping the node: %s", self.failure)
        self.stop_requested.set()
        return True

    def not_serving(self) -> str | None:
        """None while a serve process accepts; else why the DICOM listener does not."""
        for process, ready in zip(self._processes, self._readies, strict=True):
            if process is not None and process.is_alive() and ready is not None and ready.is_set():
                return None
        return "no serve process accepts DICOM associations"

    def stop(self) -> None:
        """Let each serve process finish its associations, then stop the services."""
        self._stopping.set()
        if self._monitor is not None:
            self._monitor.join(5)
        running = [p for p in self._processes if p is not None and p.is_alive()]
        for process in running:
            process.terminate()  # SIGTERM: it stops accepting and lets associations finish
        deadline = time.monotonic() + SHUTDOWN_GRACE_SECONDS + 10
        for process in running:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("serve process %s did not stop in time; killing it", process.name)
                process.kill()
                process.join(5)
        for sock in self._sockets.values():
            sock.close()
        self._services.stop()
        if self.context is not None:
            self.context.engine.dispose()
        log.info("stopped")


def _both(first: Callable[[], None], then: Callable[[], None]) -> Callable[[], None]:
    def stop() -> None:
        try:
            first()
        finally:
            then()

    return stop


def serve_process_count(config: Config) -> int:
    """node.processes, with 0 meaning one per CPU core."""
    return config.node.processes or os.cpu_count() or 1


def serve(config: Config, services: Iterable[ServiceFactory] = ()) -> int:
    """Run the node (server and background services) until SIGINT or SIGTERM: in this
    process, or in `node.processes` serve processes on the same port(s).

    What can be checked before starting is (node.process.start_checks); a start that fails
    anyway, or serve processes that keep failing to start, raise StartError with the reason.
    """
    check_start(config)
    processes = serve_process_count(config)
    # Before any child process starts: they inherit where to count.
    telemetry = NodeMetrics(config)
    try:
        if processes > 1:
            supervisor = ServeProcesses(config, tuple(services), processes)

            def start() -> None:
                supervisor.start()
                assert supervisor.context is not None
                telemetry.start(supervisor.context, supervisor.slots.held, supervisor.not_serving)

            code = run_until_signalled(
                start, _both(telemetry.stop, supervisor.stop),
                stop_requested=supervisor.stop_requested,
            )
            if supervisor.failure is not None:
                raise StartError(supervisor.failure)
            return code
        node = DicomNode(config, tuple(services))

        def start_one() -> None:
            node.start()
            telemetry.start(node.context, node.associations, node.not_serving)

        return run_until_signalled(start_one, _both(telemetry.stop, node.stop))
    except (StartError, IndexVersionError):
        raise  # an index a newer pneumonode wrote has its own message and exit status (4)
    except Exception as exc:
        log.debug("the node could not start", exc_info=True)
        raise StartError(start_failure_reason(exc)) from exc
    finally:
        telemetry.close()
