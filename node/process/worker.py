"""The analysis worker: queued images in, stored and queued-for-delivery results out.

It runs in its own process: under `pneumonode serve` (see node.process.services) or alone as
`pneumonode worker` (for example on a GPU machine sharing the index database and the
storage folder). A loader thread claims a batch and decodes its pixels (on the GPU when
the model runs there and the image is plain JPEG Baseline) while the model works on the
previous batch, so decoding stays off the accelerator's critical path; the results of each
image are built and stored by `analysis.result_processes` processes
(node.process.result_processes) while the model goes on with the next batch.

Nothing is analysed twice: result UIDs are derived from the source UID and the model
version, so a batch re-run after a crash replaces the same result instances, and the
job's completion and its deliveries are committed in one transaction.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from ai.model.choice import DEMO_NOTICE, choose_model
from ai.results.kind import ResultModel
from node.context import NodeContext
from node.metrics.definitions import metrics
from node.process.result_processes import (
    ResultPool,
    ResultTask,
    ResultWriter,
    result_process_count,
)
from storage.jobs import ClaimedJob, JobQueue, worker_identity

log = logging.getLogger(__name__)

WAITING_POLL_SECONDS = 2.0
# With no job queued, look again this often (a read-only count: cheap beside ingest).
IDLE_POLL_SECONDS = 0.05
# Filling a batch: look at the queue this often; a look that finds nothing new ends it.
BATCH_CHECK_SECONDS = 0.05
PIXEL_DATA = 0x7FE00010


@dataclass
class DecodedJob:
    job: ClaimedJob
    dataset: Dataset
    grey8: Any  # numpy uint8 HxW
    model_input: Any = None  # the same on the model's device when decoded there


def _header_only(ds: Dataset) -> Dataset:
    """The source without its pixels: the result builders copy what they reference, and
    copying a header is far cheaper than copying (possibly decoded) pixel data."""
    header = Dataset()
    for element in ds:
        if element.tag != PIXEL_DATA:
            header.add(element)
    header.file_meta = ds.file_meta
    return header


class AnalysisWorker:
    """Claims analysis jobs in batches, runs the model, stores results, queues deliveries."""

    def __init__(self, context: NodeContext, *, inline_results: bool = False) -> None:
        """`inline_results`: build results in this process, between batches (tests that
        patch the builders); otherwise `analysis.result_processes` processes build them."""
        self.context = context
        self.inline_results = inline_results
        self._results: ResultPool | None = None
        self.settings = context.config.analysis
        self.jobs = JobQueue(context.engine)
        self.identity = worker_identity()
        self._stop = threading.Event()
        self._batches: queue.Queue[list[DecodedJob]] = queue.Queue(maxsize=1)
        self._threads: list[threading.Thread] = []
        self._analyzer: Any = None
        self._heatmap_method = "gradcam"  # what [analysis] heatmap means for the loaded model
        self._model_stamp: tuple[str, tuple[float, ...]] | None = None
        self._waiting_logged = False
        self.device_uid = generate_uid(
            entropy_srcs=["pneumonode-device", context.config.node.ae_title]
        )

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        from ai.cli.console import route_library_warnings

        route_library_warnings()  # torch's deprecation notices are not the node's to show
        requeued = self.jobs.requeue_abandoned()
        if requeued:
            log.info("requeued %d analysis jobs left claimed by a stopped worker", requeued)
        self._stop.clear()
        if not self.inline_results:
            processes = result_process_count(self.settings.result_processes)
            # Enough in flight to keep every process busy while the model runs a batch.
            self._results = ResultPool(
                self.context, processes, limit=2 * self.settings.batch_size + processes
            )
            self._results.warm()
            log.info("results built by %d processes", processes)
        self._threads = [
            threading.Thread(target=self._load_loop, name="analysis-loader", daemon=True),
            threading.Thread(target=self._analyse_loop, name="analysis", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
        # A decoded batch nobody will analyse goes back to the queue.
        while True:
            try:
                batch = self._batches.get_nowait()
            except queue.Empty:
                break
            self.jobs.release([d.job.job_id for d in batch])
        if self._results is not None:  # what the model finished is stored before stopping
            self._results.close(timeout)
            self._results = None

    # --- model ----------------------------------------------------------------------------

    def _model_ready(self) -> bool:
        """Load the model once it exists (or reload it when its files change, or when a
        user's model replaces the shipped demo)."""
        model_dir = Path(self.settings.model)
        choice = choose_model(model_dir, self.settings.demo_model)
        if choice is None:
            if not self._waiting_logged:
                log.warning("analysis waits for a model at %s (none there yet)", model_dir)
                self._waiting_logged = True
            return False
        stamp = choice.stamp()
        if stamp == self._model_stamp:
            # Loaded already, or this version failed to load: keep what is loaded, if any.
            return self._analyzer is not None
        self._model_stamp = stamp
        model_dir = choice.folder
        from ai.analysis.infer import Analyzer
        from ai.model.artifact import ArtifactError

        try:
            analyzer = Analyzer(
                model_dir, device=self.settings.device, batch_size=self.settings.batch_size
            )
        except ArtifactError as exc:
            if self._analyzer is not None:
                log.error("new model at %s refused: %s; keeping the loaded one", model_dir, exc)
                return True
            log.error("model at %s refused: %s; analysis waits for a valid model", model_dir, exc)
            return False
        self._analyzer = analyzer
        metrics().model_loaded.set(1)
        self._heatmap_method = analyzer.resolve_method(self.settings.heatmap)
        self._waiting_logged = False
        log.info(
            "model %s %s loaded on %s",
            analyzer.loaded.name,
            analyzer.loaded.version,
            analyzer.device,
        )
        if choice.is_demo:
            log.warning(
                "analysis uses %s: put your own model at %s to replace it, or set "
                "analysis.demo_model = false",
                DEMO_NOTICE,
                self.settings.model,
            )
        return True

    # --- loader: claim + decode -----------------------------------------------------------

    def _load_loop(self) -> None:
        while not self._stop.is_set():
            try:
                if not self._model_ready():
                    self._stop.wait(WAITING_POLL_SECONDS)
                    continue
                claimed = self._claim_batch()
                if not claimed:
                    continue
                batch = self._decode_batch(claimed)
                if not batch:
                    continue
                while not self._stop.is_set():
                    try:
                        self._batches.put(batch, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                else:
                    self.jobs.release([d.job.job_id for d in batch])
            except Exception:
                log.exception("analysis loader error; retrying")
                self._stop.wait(WAITING_POLL_SECONDS)

    def _claim_batch(self) -> list[ClaimedJob]:
        """Wait for a first job, then for a full batch while more keep coming (up to
        max_wait), then claim.

        A burst fills the batch within milliseconds; a single image, or the end of a
        burst, is claimed as soon as one check finds nothing new, instead of after the
        whole max_wait: an idle node's latency is the analysis, not a fixed wait.
        """
        size = self.settings.batch_size
        waiting = self.jobs.queued_count()
        if waiting == 0:
            self._stop.wait(IDLE_POLL_SECONDS)
            return []
        deadline = time.monotonic() + self.settings.max_wait_seconds
        while waiting < size and time.monotonic() < deadline and not self._stop.is_set():
            self._stop.wait(min(BATCH_CHECK_SECONDS, max(0.0, deadline - time.monotonic())))
            arrived = self.jobs.queued_count()
            if arrived <= waiting:
                break  # nothing new since the last look: the batch is what there is
            waiting = arrived
        return self.jobs.claim(self.identity, size)

    def _decode_batch(self, claimed: list[ClaimedJob]) -> list[DecodedJob]:
        """Each image decoded once: on the model's GPU (nvJPEG) when it can be, else here."""
        from ai.data.preprocess import decode_jpeg_on_gpu, gpu_decodable

        device = self._analyzer.device
        batch: list[DecodedJob] = []
        for_gpu: list[tuple[ClaimedJob, Dataset]] = []
        for job in claimed:
            ds = self._read(job)
            if ds is not None and gpu_decodable(ds, device):
                for_gpu.append((job, ds))
            elif ds is not None:
                batch.extend(self._decode_here(job, ds))
        if for_gpu:
            try:
                images = decode_jpeg_on_gpu([ds for _, ds in for_gpu], device)
            except Exception as exc:  # nvJPEG refusing a stream: the CPU decodes the batch
                log.warning("GPU JPEG decoding failed (%s); decoding on the CPU", exc)
                for job, ds in for_gpu:
                    batch.extend(self._decode_here(job, ds))
            else:
                for (job, ds), image in zip(for_gpu, images, strict=True):
                    batch.append(DecodedJob(job, _header_only(ds), image.cpu().numpy(), image))
        return batch

    def _read(self, job: ClaimedJob) -> Dataset | None:
        try:
            return dcmread(self.context.archive.path_of(job.file_path))
        except Exception as exc:  # an unreadable image fails its own job only
            self._decode_failed(job, exc)
            return None

    def _decode_here(self, job: ClaimedJob, ds: Dataset) -> list[DecodedJob]:
        from ai.data.preprocess import read_grey8

        try:
            return [DecodedJob(job=job, dataset=_header_only(ds), grey8=read_grey8(ds))]
        except Exception as exc:  # an unsupported image fails its own job only
            self._decode_failed(job, exc)
            return []

    def _decode_failed(self, job: ClaimedJob, exc: Exception) -> None:
        log.warning("analysis of SOP %s failed to decode: %s", job.sop_instance_uid, exc)
        self.jobs.fail([job.job_id], f"decode: {type(exc).__name__}: {exc}")

    # --- analysis -------------------------------------------------------------------------

    def _analyse_loop(self) -> None:
        while not self._stop.is_set():
            try:
                batch = self._batches.get(timeout=0.5)
            except queue.Empty:
                continue
            ids = [d.job.job_id for d in batch]
            try:
                self.analyse(batch)
            except Exception as exc:
                log.exception("analysis of a batch of %d failed", len(ids))
                self.jobs.fail(ids, f"{type(exc).__name__}: {exc}")

    def analyse(self, batch: list[DecodedJob]) -> None:
        """One batched forward + GradCAM, then the results of every image, built and stored
        by the result processes (or here, inline) while the next batch is analysed."""
        analyzer = self._analyzer  # the model that made the predictions names the results
        started = time.perf_counter()
        inputs = [d.grey8 if d.model_input is None else d.model_input for d in batch]
        predictions = analyzer.explain(inputs, method=self._heatmap_method)
        model_seconds = time.perf_counter() - started
        model = self._result_model(analyzer)
        counted = metrics()
        for decoded, prediction in zip(batch, predictions, strict=True):
            counted.inference_seconds.observe(model_seconds / len(batch))
            counted.predictions.labels(prediction.label).inc()
            counted.probability.observe(prediction.probability)
            task = ResultTask(
                job=decoded.job,
                header=decoded.dataset,
                grey8=decoded.grey8,
                probability=prediction.probability,
                label=prediction.label,
                heatmap=prediction.heatmap,
                method_title=prediction.method_title,
            )
            if self._results is not None:
                self._results.submit(model, task)
            else:
                ResultWriter(self.context, model).write(task)
        log.debug("batch of %d analysed, model %.3f s", len(batch), model_seconds)

    def _result_model(self, analyzer: Any) -> ResultModel:
        loaded = analyzer.loaded
        return ResultModel(
            name=loaded.name,
            version=loaded.version,
            positive_class=loaded.positive_class,
            threshold=loaded.threshold,
            observer_name=self.context.config.node.ae_title,
            observer_uid=self.device_uid,
            sc_transfer_syntax=self.settings.sc_transfer_syntax,
        )
