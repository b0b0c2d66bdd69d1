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
from pydicom.uid import generate_uid

from node.config import Config
from node.context import NodeContext
from node.process.logs import configure_logging
from node.process.supervision import tie_to_parent
from storage import deliveries
from storage.jobs import MAX_ATTEMPTS, ClaimedJob, JobQueue

log = logging.getLogger(__name__)

MANUFACTURER = "pneumonode"
SC_SERIES_NUMBER = 9001
SR_SERIES_NUMBER = 9002


@dataclass(frozen=True)
class ResultModel:
    """What the results say about the model that made them and the node that built them."""

    name: str
    version: str
    positive_class: str
    threshold: float
    observer_name: str  # the node's AE title: the SR's device observer
    observer_uid: str
    sc_transfer_syntax: str


@dataclass
class ResultTask:
    """One analysed image: everything its results are built from, nothing to decode again."""

    job: ClaimedJob
    header: Dataset  # the source without its pixels
    grey8: Any  # numpy uint8 HxW, the X-ray as displayed
    probability: float
    label: str
    heatmap: Any  # numpy float32 in [0, 1], any size
    method_title: str = "GradCAM"


def result_uids(source: Dataset, model_version: str) -> dict[str, str]:
    """Deterministic UIDs for the results of `source`: the same inputs give the same UIDs."""
    study = str(source.StudyInstanceUID)
    sop = str(source.SOPInstanceUID)
    return {
        "sc_series": generate_uid(entropy_srcs=["pneumonode-sc-series", study, model_version]),
        "sr_series": generate_uid(entropy_srcs=["pneumonode-sr-series", study, model_version]),
        "sc": generate_uid(entropy_srcs=["pneumonode-sc", sop, model_version]),
        "sr": generate_uid(entropy_srcs=["pneumonode-sr", sop, model_version]),
    }


def instance_number(source: Dataset) -> int:
    """The source's Instance Number for its results, 1 when it has none usable."""
    try:
        number = int(source.get("InstanceNumber") or 1)
    except (TypeError, ValueError):
        return 1
    return number if 0 < number < 2**31 else 1


def result_process_count(setting: int, cpus: int | None = None) -> int:
    """`analysis.result_processes`: 0 = one per CPU core but one (the worker's), at least 1."""
    if setting > 0:
        return setting
    return max(1, (cpus if cpus is not None else os.cpu_count() or 2) - 1)


class ResultWriter:
    """Builds and stores the results of one image and finishes its job, in any process."""

    def __init__(self, context: NodeContext, model: ResultModel) -> None:
        self.context = context
        self.model = model
        self.jobs = JobQueue(context.engine)

    def write(self, task: ResultTask) -> None:
        """An image whose results cannot be built or stored fails its own job, once, with the
        reason `pneumonode status` shows; nothing requeues it but `pneumonode retry`."""
        from ai.results.errors import ResultBuildError

        uid = task.job.sop_instance_uid
        try:
            sc, sr = self.build(task)
        except ResultBuildError as exc:
            log.warning("results of SOP %s not built: %s", uid, exc)
            self.jobs.fail([task.job.job_id], f"results: {exc}")
            return
        try:
            self.store(task, sc, sr)
        except Exception as exc:
            log.exception("results of SOP %s not stored", uid)
            self.jobs.fail([task.job.job_id], f"results not stored: {type(exc).__name__}: {exc}")

    def build(self, task: ResultTask) -> tuple[Dataset, Dataset]:
        """The SC and the SR of one image, both built before either is stored."""
        from ai.results.attributes import source_header
        from ai.results.errors import building
        from ai.results.sc.picture import render_picture
        from ai.results.sc.sop import build_heatmap_sc
        from ai.results.sr.sop import build_finding_sr

        model = self.model
        with building("result header"):
            source = source_header(task.header)  # checked once for both objects
        uids = result_uids(source, model.version)
        number = instance_number(source)
        with building("heatmap picture"):
            picture = render_picture(
                task.grey8,
                task.heatmap,
                task.probability,
                task.label,
                threshold=model.threshold,
                model=f"{model.name} ({model.version})",
                method=task.method_title,
            )
        with building("heatmap Secondary Capture"):
            sc = build_heatmap_sc(
                source,
                picture.rgb,
                pixel_scale=picture.scale,
                series_instance_uid=uids["sc_series"],
                sop_instance_uid=uids["sc"],
                series_number=SC_SERIES_NUMBER,
                instance_number=number,
                manufacturer=MANUFACTURER,
                model_name=model.name,
                software_version=model.version,
                transfer_syntax=model.sc_transfer_syntax,
                heatmap_method=task.method_title,
            )
        with building("finding Structured Report"):
            sr = build_finding_sr(
                source,
                probability=task.probability,
                present=task.label == model.positive_class,
                threshold=model.threshold,
                algorithm_name=model.name,
                algorithm_version=model.version,
                heatmap_method=task.method_title,
                device_observer_name=model.observer_name,
                device_observer_uid=model.observer_uid,
                device_observer_manufacturer=MANUFACTURER,
                series_instance_uid=uids["sr_series"],
                sop_instance_uid=uids["sr"],
                series_number=SR_SERIES_NUMBER,
                instance_number=number,
            )
        return sc, sr

    def store(self, task: ResultTask, sc: Dataset, sr: Dataset) -> None:
        """Store both results, then mark the job done and queue the deliveries together."""
        archive = self.context.archive
        archive.store_dataset(sc, is_result=True)
        archive.store_dataset(sr, is_result=True)
        destination, kept_because = self.destination(task.job)
        with self.context.engine.begin() as conn:
            self.jobs.finish(
                task.job.job_id,
                probability=task.probability,
                label=task.label,
                sc_uid=str(sc.SOPInstanceUID),
                sr_uid=str(sr.SOPInstanceUID),
                note=kept_because,
                conn=conn,
            )
            if destination is not None:
                deliveries.enqueue(
                    conn, [str(sc.SOPInstanceUID), str(sr.SOPInstanceUID)], destination
                )
        log.info(
            "analysed SOP %s: p=%.4f %s; SC %s SR %s -> %s",
            task.job.sop_instance_uid,
            task.probability,
            task.label,
            sc.SOPInstanceUID,
            sr.SOPInstanceUID,
            destination or "kept on node",
        )

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
