"""The results of analysed images: built, stored, and their job finished with their deliveries.

The worker's own job is the model. Turning its output into a Secondary Capture and a
Structured Report, storing both and queueing their delivery is Python work per image that
one process cannot do at a GPU's pace, so `ResultPool` runs it in
`analysis.result_processes` spawned processes while the worker goes on with the next
batch. Each process opens its own index engine and archive (processes share nothing but
the database and the storage folder) and, as `ResultWriter` does in any process, marks a
job done in the same transaction that queues its deliveries, after both results are stored.
A pool process that dies gives its images' jobs back to the queue (the worker releases
them); a worker that dies leaves them claimed by a dead process, which the next worker
requeues.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

from pydicom.dataset import Dataset

from ai.results.kind import (
    KindUids,
    MadeResult,
    ResultInputs,
    ResultKind,
    ResultModel,
    ResultNotMade,
    instance_number,
    kinds_named,
    tracking_uid,
)
from node.config import Config
from node.context import NodeContext
from node.metrics.definitions import metrics
from node.nudges import DELIVERIES_NUDGE, nudge, nudge_address
from node.process.logs import configure_logging
from node.process.supervision import tie_to_parent
from storage import deliveries
from storage.jobs import MAX_ATTEMPTS, ClaimedJob, JobQueue, ResultRecord
from storage.models import ResultState

log = logging.getLogger(__name__)


@dataclass
class ResultTask:
    """One analysed image as the worker hands it over: what its results are built from."""

    job: ClaimedJob
    header: Dataset  # the source without its pixels
    grey8: Any  # numpy uint8 HxW, the X-ray as displayed
    probability: float
    label: str
    heatmap: Any  # numpy float32 in [0, 1], any size
    method_title: str = "GradCAM"


def result_process_count(setting: int, cpus: int | None = None) -> int:
    """`analysis.result_processes`: 0 = one per CPU core but one (the worker's), at least 1."""
    if setting > 0:
        return setting
    return max(1, (cpus if cpus is not None else os.cpu_count() or 2) - 1)


class ResultWriter:
    """Builds and stores the results of one image, kind by kind, and finishes its job, in
    any process. It knows the kinds only through `ai.results.kind`'s interface."""

    def __init__(self, context: NodeContext, model: ResultModel) -> None:
        self.context = context
        self.model = model
        self.jobs = JobQueue(context.engine)
        self.kinds = kinds_named(context.config.analysis.results)
        self._sender_nudge = nudge_address(context.config.storage.folder, DELIVERIES_NUDGE)

    def inputs(self, task: ResultTask) -> ResultInputs:
        """What every kind is built from; the source header checked once for all of them,
        the finding's regions found once (when the map is the mask head's and the finding
        is present)."""
        from ai.analysis.methods import METHOD_TITLES
        from ai.results.attributes import source_header
        from ai.results.errors import building
        from ai.results.regions import find_regions

        with building("result header"):
            header = source_header(task.header)
        present = task.label == self.model.positive_class
        segmentation = task.heatmap if task.method_title == METHOD_TITLES["segmentation"] else None
        regions = None
        if segmentation is not None and present:
            with building("finding regions"):
                regions = find_regions(segmentation, int(header.Rows), int(header.Columns))
        return ResultInputs(
            header=header,
            grey8=task.grey8,
            probability=task.probability,
            present=present,
            label=task.label,
            heatmap=task.heatmap,
            method_title=task.method_title,
            tracking_uid=tracking_uid(header, self.model.version),
            instance_number=instance_number(header),
            segmentation=segmentation,
            regions=regions,
        )

    def write(self, task: ResultTask) -> None:
        """Each kind is built and stored on its own: one that cannot be fails with its
        reason (the job then shows as failed, for `pneumonode retry`), the others are
        stored and delivered. Nothing requeues a failed kind but `pneumonode retry`."""
        from ai.results.errors import ResultBuildError

        uid = task.job.sop_instance_uid
        try:
            inputs = self.inputs(task)
        except ResultBuildError as exc:
            log.warning("results of SOP %s not built: %s", uid, exc)
            self.jobs.fail([task.job.job_id], f"results: {exc}")
            for kind in self.kinds:
                metrics().results.labels(kind.name, ResultState.FAILED.value).inc()
            return
        records = [self.make(kind, inputs) for kind in self.kinds]
        for record in records:
            metrics().results.labels(record.kind, record.state.value).inc()
        stored = [r.sop_instance_uid for r in records if r.state == ResultState.STORED]
        destination, kept_because = self.destination(task.job)
        to_deliver = stored if destination is not None else []
        with self.context.engine.begin() as conn:
            self.jobs.finish(
                task.job.job_id,
                probability=task.probability,
                label=task.label,
                results=records,
                note=kept_because,
                conn=conn,
            )
            if to_deliver:
                deliveries.enqueue(conn, to_deliver, destination)
        if to_deliver:  # committed: the result sender (another process) can send them now
            nudge(self._sender_nudge)
        log.info(
            "analysed SOP %s: p=%.4f %s; %s -> %s",
            uid,
            task.probability,
            task.label,
            ", ".join(_outcome(r) for r in records),
            destination or "kept on node",
        )

    def make(self, kind: ResultKind, inputs: ResultInputs) -> ResultRecord:
        """Build and store one kind for one image; what became of it."""
        uid = str(inputs.header.SOPInstanceUID)
        uids = KindUids.of(kind.name, inputs.header, self.model.version)
        try:
            dataset = kind.build(inputs, self.model, uids)
        except ResultNotMade as why:
            return ResultRecord(kind.name, ResultState.NOT_MADE, reason=str(why))
        except Exception as exc:  # a kind's builder may raise anything: it fails alone
            log.warning("%s of SOP %s not built: %s", kind.name, uid, exc)
            reason = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
            return ResultRecord(kind.name, ResultState.FAILED, reason=reason)
        try:
            self.context.archive.store_dataset(dataset, is_result=True)
        except Exception as exc:
            log.exception("%s of SOP %s not stored", kind.name, uid)
            return ResultRecord(
                kind.name, ResultState.FAILED, reason=f"not stored: {type(exc).__name__}: {exc}"
            )
        inputs.made[kind.name] = MadeResult(
            kind.name,
            kind.series_number,
            kind.series_title,
            str(dataset.SOPClassUID),
            uids.sop,
            uids.series,
        )
        return ResultRecord(kind.name, ResultState.STORED, sop_instance_uid=uids.sop)

    def destination(self, job: ClaimedJob) -> tuple[str | None, str]:
        """(the configured destination, else the sender if it is a known peer; and, when
        there is none, why the results stay on the node)."""
        config = self.context.config
        title = config.delivery.destination or job.calling_ae.strip()
        if title and config.peer(title) is not None:
            return title, ""
        if config.delivery.destination:
            reason = f"destination {title!r} is not in [[peers]]"
        elif title:
            reason = f"caller {title!r} is not in [[peers]] and no delivery.destination is set"
        else:
            reason = "no calling AE title (imported) and no delivery.destination is set"
        log.info("results of SOP %s stay on the node: %s", job.sop_instance_uid, reason)
        return None, reason


def _outcome(record: ResultRecord) -> str:
    if record.state == ResultState.STORED:
        return f"{record.kind.upper()} {record.sop_instance_uid}"
    return f"{record.kind.upper()} {record.state.value.replace('_', ' ')}"


# --- the pool ---------------------------------------------------------------------------

_child_context: NodeContext | None = None


def _start_child(config: Config, log_level: int, parent_pid: int) -> None:
    """A pool process: its own logging, index engine and archive; one torch thread (the
    overlay's interpolation), since the pool's processes are the parallelism."""
    global _child_context
    # A Ctrl-C in serve's terminal reaches the whole process group: the worker that owns
    # this pool stops it in order (what was handed over is still written), so the pool's
    # processes leave SIGINT to it instead of dying with a traceback mid-result.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Left alone it would outlive a killed worker (it waits on a queue whose other end it
    # holds itself); its images' jobs are then requeued by the next worker.
    tie_to_parent(parent_pid)
    from ai.cli.console import route_library_warnings
    from node.context import build_context

    configure_logging(logging.getLevelName(log_level))
    route_library_warnings()
    import torch

    torch.set_num_threads(1)
    _child_context = build_context(config)


def _ready() -> None:
    """Nothing: submitted once per process so that they start before the first results."""


def _write_in_child(model: ResultModel, task: ResultTask) -> None:
    assert _child_context is not None, "the pool's initializer did not run"
    ResultWriter(_child_context, model).write(task)


class ResultPool:
    """`processes` spawned processes writing results; at most `limit` images in flight."""

    def __init__(self, context: NodeContext, processes: int, limit: int) -> None:
        self.context = context
        self.processes = processes
        self.limit = max(limit, processes)
        self.jobs = JobQueue(context.engine)
        self._pool: ProcessPoolExecutor | None = None
        self._in_flight: dict[Future, ClaimedJob] = {}
        self._room = threading.Condition()

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.processes,
                mp_context=get_context("spawn"),  # the worker has threads (and maybe CUDA)
                initializer=_start_child,
                initargs=(
                    self.context.config,
                    logging.getLogger().getEffectiveLevel(),
                    os.getpid(),
                ),
            )
        return self._pool

    def warm(self) -> None:
        """Start the processes now (each imports torch and highdicom: seconds), while the
        worker loads its model, rather than when the first batch is done."""
        for _ in range(self.processes):
            self._executor().submit(_ready)

    def submit(self, model: ResultModel, task: ResultTask) -> None:
        """Queue one image's results; waits while `limit` images are in flight."""
        with self._room:
            self._room.wait_for(lambda: len(self._in_flight) < self.limit)
            try:
                future = self._executor().submit(_write_in_child, model, task)
            except BrokenProcessPool:
                self._restart()
                future = self._executor().submit(_write_in_child, model, task)
            self._in_flight[future] = task.job
        future.add_done_callback(self._done)

    def _done(self, future: Future) -> None:
        with self._room:
            job = self._in_flight.pop(future)
            self._room.notify_all()
        if future.cancelled():  # never started (the pool was shut down): back to the queue
            self.jobs.release([job.job_id])
            return
        error = future.exception()
        if error is None:
            return
        if isinstance(error, BrokenProcessPool):
            # The process died with the image (a crash, or killed): the job goes back to
            # the queue, unless it has now been tried as often as a job may be.
            if job.attempts >= MAX_ATTEMPTS:
                self.jobs.fail([job.job_id], "a result process died building its results")
            else:
                self.jobs.release([job.job_id])
            log.error("result process died; SOP %s %s", job.sop_instance_uid,
                      "failed" if job.attempts >= MAX_ATTEMPTS else "requeued")
        else:
            log.error("results of SOP %s failed: %s", job.sop_instance_uid, error)
            self.jobs.fail([job.job_id], f"results: {type(error).__name__}: {error}")

    def _restart(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until nothing is in flight; False if `timeout` passed first."""
        with self._room:
            return self._room.wait_for(lambda: not self._in_flight, timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Let what is in flight finish (its jobs are then done or failed), then stop; what
        is still running after `timeout` is left to end with this process, its jobs claimed
        by it, for the next worker to requeue."""
        finished = self.wait(timeout)
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        if not finished:
            return
        # Nothing is being built: a process still starting up (`warm`: seconds of imports,
        # many more on a loaded host) need not finish before the worker stops.
        for process in processes:
            process.join(2.0)
            if process.is_alive():
                process.terminate()
                process.join(5.0)
