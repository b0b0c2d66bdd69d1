"""The background services that run beside the DICOM server, and `pneumonode worker`.

`serve` always runs the result sender (deliveries may be queued by a worker elsewhere)
and, when analysis is enabled and `analysis.run_in_serve` is true, the analysis worker as
a child process that it supervises and that dies with it. The worker is a process rather
than a thread because decoding, GradCAM and building the result objects are seconds of
Python per batch: in the Storage SCP's process they would hold the GIL and slow ingest
several times over.
`pneumonode worker` runs the same worker on its own, against the same database and storage
folder, for example on a GPU machine.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import threading
import time

from node.config import Config
from node.context import NodeContext, build_context
from node.dicom.sender import DeliverySender
from node.metrics.multiprocess import process_died
from node.process.logs import configure_logging
from node.process.server import ServiceFactory
from node.process.supervision import run_until_signalled, tie_to_parent
from node.process.worker import AnalysisWorker

log = logging.getLogger(__name__)

WORKER_NICENESS = 10
RESTART_DELAY_SECONDS = 5.0
STOP_TIMEOUT_SECONDS = 60.0


def _worker_process_main(config: Config, log_level: int, parent_pid: int) -> None:
    """Entry point of the supervised worker process (a fresh interpreter: spawn)."""
    tie_to_parent(parent_pid)
    configure_logging(logging.getLevelName(log_level))
    raise SystemExit(run_worker(config, share_cpu=True))


class WorkerProcess:
    """The analysis worker as a child process of `serve`, restarted if it dies."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._context = multiprocessing.get_context("spawn")
        self._process: multiprocessing.process.BaseProcess | None = None
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None

    def _spawn(self) -> None:
        self._process = self._context.Process(
            target=_worker_process_main,
            args=(self.config, logging.getLogger().getEffectiveLevel(), os.getpid()),
            name="pneumonode-worker",
        )
        self._process.start()
        log.info("analysis worker process started (pid %d)", self._process.pid)

    def start(self) -> None:
        self._stopping.clear()
        self._spawn()
        self._monitor = threading.Thread(target=self._watch, name="worker-monitor", daemon=True)
        self._monitor.start()

    def _watch(self) -> None:
        while not self._stopping.wait(1.0):
            process = self._process
            if process is not None and not process.is_alive() and not self._stopping.is_set():
                process_died(process.pid)
                log.error(
                    "analysis worker process exited with %s; restarting in %.0f s",
                    process.exitcode,
                    RESTART_DELAY_SECONDS,
                )
                if self._stopping.wait(RESTART_DELAY_SECONDS):
                    return
                self._spawn()

    def stop(self) -> None:
        self._stopping.set()
        if self._monitor is not None:
            self._monitor.join(5)
        process = self._process
        if process is None or not process.is_alive():
            return
        process.terminate()  # SIGTERM: the worker finishes its batch and releases its claims
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            log.warning("analysis worker process did not stop in time; killing it")
            process.kill()
            process.join(5)
        process_died(process.pid)


def node_services(config: Config) -> list[ServiceFactory]:
    """Factories of the services `serve` starts once its context exists."""
    senders: list[DeliverySender] = []

    def sender(context: NodeContext) -> DeliverySender:
        service = DeliverySender(context)
        senders.append(service)
        return service

    def worker(context: NodeContext) -> WorkerProcess:
        return WorkerProcess(context.config)

    factories: list[ServiceFactory] = [sender]
    if config.analysis.enabled and config.analysis.run_in_serve:
        factories.extend([worker] * config.analysis.worker_processes)
    return factories


def _yield_cpu_to_ingest(config: Config) -> None:
    """Lower this process's priority and, analysing on the CPU, give torch half the cores."""
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICENESS)
    from ai.model.artifact import resolve_device

    if resolve_device(config.analysis.device).type == "cpu":
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))


def run_worker(config: Config, share_cpu: bool = False) -> int:
    """Run the analysis worker until SIGINT or SIGTERM.

    `share_cpu` (the worker under `serve`): lower this process's CPU priority and, on the
    CPU, give torch half the cores, so the Storage SCP keeps its pace.
    """
    if not config.analysis.enabled:
        log.warning("analysis.enabled is false: the worker will find no queued jobs")
    if share_cpu:
        _yield_cpu_to_ingest(config)
    context = build_context(config)
    worker = AnalysisWorker(context)

    def start() -> None:
        worker.start()
        log.info(
            "analysis worker started (model %s, device %s)",
            config.analysis.model,
            config.analysis.device,
        )

    def stop() -> None:
        worker.stop()
        context.engine.dispose()

    return run_until_signalled(start, stop, what="analysis worker")
