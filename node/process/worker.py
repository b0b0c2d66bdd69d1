"""The analysis worker: queued images in, stored and queued-for-delivery results out.

It runs in its own process: under `pneumonode serve` (see node.process.services) or alone as
`pneumonode worker` (for example on a GPU machine sharing the index database and the
storage folder). A loader thread claims a batch and decodes its pixels while the model
works on the previous batch, so decoding stays off the accelerator's critical path.

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

from node.context import NodeContext
from storage import deliveries
from storage.jobs import ClaimedJob, JobQueue, worker_identity

log = logging.getLogger(__name__)

MANUFACTURER = "pneumonode"
SC_SERIES_NUMBER = 9001
SR_SERIES_NUMBER = 9002
MODEL_FILES = ("model.json", "model.safetensors")
WAITING_POLL_SECONDS = 2.0
PIXEL_DATA = 0x7FE00010


@dataclass
class DecodedJob:
    job: ClaimedJob
    dataset: Dataset
    grey8: Any  # numpy uint8 HxW


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

    def __init__(self, context: NodeContext) -> None:
        self.context = context
        self.settings = context.config.analysis
        self.jobs = JobQueue(context.engine)
        self.identity = worker_identity()
        self._stop = threading.Event()
        self._batches: queue.Queue[list[DecodedJob]] = queue.Queue(maxsize=1)
        self._threads: list[threading.Thread] = []
        self._analyzer: Any = None
        self._model_stamp: tuple[float, ...] | None = None
        self._waiting_logged = False
        self.device_uid = generate_uid(
            entropy_srcs=["pneumonode-device", context.config.node.ae_title]
        )

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        from ai.console import route_library_warnings

        route_library_warnings()  # torch's deprecation notices are not the node's to show
        requeued = self.jobs.requeue_abandoned()
        if requeued:
            log.info("requeued %d analysis jobs left claimed by a stopped worker", requeued)
        self._stop.clear()
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

    # --- model ----------------------------------------------------------------------------

    def _model_ready(self) -> bool:
        """Load the model once it exists (or reload it when its files change)."""
        model_dir = Path(self.settings.model)
        paths = [model_dir / name for name in MODEL_FILES]
        if not all(p.is_file() for p in paths):
            if not self._waiting_logged:
                log.warning("analysis waits for a model at %s (none there yet)", model_dir)
                self._waiting_logged = True
            return False
        stamp = tuple(p.stat().st_mtime for p in paths)
        if stamp == self._model_stamp:
            # Loaded already, or this version failed to load: keep what is loaded, if any.
            return self._analyzer is not None
        self._model_stamp = stamp
        from ai.artifact import ArtifactError
        from ai.infer import Analyzer

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
        self._waiting_logged = False
        log.info(
            "model %s %s loaded on %s",
            analyzer.loaded.name,
            analyzer.loaded.version,
            analyzer.device,
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
                batch = [d for d in map(self._decode, claimed) if d is not None]
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
        """Wait for a first job, then up to max_wait for a full batch, then claim."""
        size = self.settings.batch_size
        waiting = self.jobs.queued_count()
        if waiting == 0:
            self._stop.wait(0.2)
            return []
        deadline = time.monotonic() + self.settings.max_wait_seconds
        while waiting < size and time.monotonic() < deadline and not self._stop.is_set():
            self._stop.wait(min(0.05, max(0.0, deadline - time.monotonic())))
            waiting = self.jobs.queued_count()
        return self.jobs.claim(self.identity, size)

    def _decode(self, job: ClaimedJob) -> DecodedJob | None:
        from ai.preprocess import read_grey8

        path = self.context.archive.path_of(job.file_path)
        try:
            ds = dcmread(path)
            grey8 = read_grey8(ds)
        except Exception as exc:  # an unreadable or unsupported image fails its own job only
            log.warning("analysis of SOP %s failed to decode: %s", job.sop_instance_uid, exc)
            self.jobs.fail([job.job_id], f"decode: {type(exc).__name__}: {exc}")
            return None
        return DecodedJob(job=job, dataset=_header_only(ds), grey8=grey8)

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
        """One batched forward + GradCAM, then the result objects of every image.

        An image whose results cannot be built or stored fails its own job, once, with the
        reason `pneumonode status` shows; nothing requeues it but `pneumonode retry`.
        """
        from ai.results.errors import ResultBuildError

        analyzer = self._analyzer  # the model that made the predictions names the results
        started = time.perf_counter()
        predictions = analyzer.explain([d.grey8 for d in batch])
        model_seconds = time.perf_counter() - started
        for decoded, prediction in zip(batch, predictions, strict=True):
            uid = decoded.job.sop_instance_uid
            try:
                sc, sr = self._build_results(analyzer.loaded, decoded, prediction)
            except ResultBuildError as exc:
                log.warning("results of SOP %s not built: %s", uid, exc)
                self.jobs.fail([decoded.job.job_id], f"results: {exc}")
                continue
            try:
                self._store_results(decoded, prediction, sc, sr)
            except Exception as exc:
                log.exception("results of SOP %s not stored", uid)
                self.jobs.fail(
                    [decoded.job.job_id], f"results not stored: {type(exc).__name__}: {exc}"
                )
        log.debug("batch of %d analysed, model %.3f s", len(batch), model_seconds)

    def _build_results(
        self, loaded: Any, decoded: DecodedJob, prediction: Any
    ) -> tuple[Dataset, Dataset]:
        """The SC and the SR of one image, both built before either is stored."""
        from ai.results.errors import building
        from ai.results.finding_sr import build_finding_sr
        from ai.results.heatmap_sc import build_heatmap_sc
        from ai.results.overlay import render_picture

        source = decoded.dataset
        uids = result_uids(source, loaded.version)
        instance_number = _instance_number(source)
        with building("heatmap picture"):
            picture = render_picture(
                decoded.grey8,
                prediction.heatmap,
                prediction.probability,
                prediction.label,
                model=f"{loaded.name} ({loaded.version})",
            )
        with building("heatmap Secondary Capture"):
            sc = build_heatmap_sc(
                source,
                picture.rgb,
                pixel_scale=picture.scale,
                series_instance_uid=uids["sc_series"],
                sop_instance_uid=uids["sc"],
                series_number=SC_SERIES_NUMBER,
                instance_number=instance_number,
                manufacturer=MANUFACTURER,
                model_name=loaded.name,
                software_version=loaded.version,
                transfer_syntax=self.settings.sc_transfer_syntax,
            )
        with building("finding Structured Report"):
            sr = build_finding_sr(
                source,
                probability=prediction.probability,
                present=prediction.label == loaded.positive_class,
                threshold=loaded.threshold,
                algorithm_name=loaded.name,
                algorithm_version=loaded.version,
                device_observer_name=self.context.config.node.ae_title,
                device_observer_uid=self.device_uid,
                device_observer_manufacturer=MANUFACTURER,
                series_instance_uid=uids["sr_series"],
                sop_instance_uid=uids["sr"],
                series_number=SR_SERIES_NUMBER,
                instance_number=instance_number,
            )
        return sc, sr

    def _store_results(
        self, decoded: DecodedJob, prediction: Any, sc: Dataset, sr: Dataset
    ) -> None:
        """Store both results, then mark the job done and queue the deliveries together."""
        archive = self.context.archive
        archive.store_dataset(sc, is_result=True)
        archive.store_dataset(sr, is_result=True)
        destination, kept_because = self._destination(decoded.job)
        with self.context.engine.begin() as conn:
            self.jobs.finish(
                decoded.job.job_id,
                probability=prediction.probability,
                label=prediction.label,
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
            decoded.job.sop_instance_uid,
            prediction.probability,
            prediction.label,
            sc.SOPInstanceUID,
            sr.SOPInstanceUID,
            destination or "kept on node",
        )

    def _destination(self, job: ClaimedJob) -> tuple[str | None, str]:
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


def _instance_number(source: Dataset) -> int:
    """The source's Instance Number for its results, 1 when it has none usable."""
    try:
        number = int(source.get("InstanceNumber") or 1)
    except (TypeError, ValueError):
        return 1
    return number if 0 < number < 2**31 else 1
