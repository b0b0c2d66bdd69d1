"""Store one DICOM instance: validate its header, write the file, index it, commit.

This is the single path by which anything enters the archive: C-STORE, `pneumonode
import` and the node's own results all go through `Archive.store_file_bytes`, so every
instance obeys the same rules. When it returns, the file and its index row are durable
(fsync + commit), which is when the Storage SCP may answer Success.
"""

from __future__ import annotations

import io
import logging
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import data_element_generator
from pydicom.uid import UID
from sqlalchemy import Connection, Engine, bindparam, insert, select
from sqlalchemy.exc import IntegrityError

from storage.filestore import FileStore, InvalidUIDError, check_uid
from storage.indexer import HeaderRecord, IndexWriter
from storage.models import AnalysisJob, Instance, JobState, utcnow

log = logging.getLogger(__name__)

DUPLICATE_POLICIES = ("replace", "keep-first")

# Decides, inside the storing transaction, whether an instance gets an analysis job:
# returns None (no job), or (JobState.QUEUED | JobState.SKIPPED, reason).
JobDecision = Callable[[HeaderRecord, bool], tuple[JobState, str] | None]


# Built once, run with parameters (see storage.indexer: cheaper than literal statements).
_SELECT_FILE_PATH = select(Instance.file_path).where(Instance.sop_instance_uid == bindparam("sop"))
_SELECT_JOB = select(AnalysisJob.id).where(AnalysisJob.sop_instance_uid == bindparam("sop"))
_INSERT_JOB = insert(AnalysisJob)


class StoreError(Exception):
    """An instance was refused; nothing of it was written or indexed."""


class UnreadableDatasetError(StoreError):
    """The bytes are not a DICOM dataset pydicom can parse."""


class InvalidDatasetError(StoreError):
    """The dataset lacks, or has an invalid, attribute the archive needs (a UID)."""


@dataclass(frozen=True)
class StoreOutcome:
    """What happened to one instance offered to the archive."""

    record: HeaderRecord
    relative_path: str
    file_size: int
    action: str  # "stored", "replaced" or "kept-first"


def read_header(data: bytes | memoryview) -> Dataset:
    """Parse the file meta and the header elements, and check the dataset is whole.

    Pixel data is not decoded. pydicom reads a truncated or garbled dataset without
    complaint, keeping what it could, so the element structure is walked to the end.
    """
    try:
        ds = dcmread(io.BytesIO(data), stop_before_pixels=True)
        _check_whole(data, ds)
        return ds
    except UnreadableDatasetError:
        raise
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError) as exc:
        raise UnreadableDatasetError(f"cannot parse dataset: {exc}") from exc
    except Exception as exc:  # pydicom raises a wide range of errors on corrupt input
        raise UnreadableDatasetError(f"cannot parse dataset: {type(exc).__name__}: {exc}") from exc


def envelope_mismatch(
    header: Dataset, *, sop_class: str, sop_instance: str, envelope: str
) -> str | None:
    """Why a dataset is not the instance its envelope (C-STORE request, presentation
    context, file meta) announces, or None; an empty announced value is not checked."""
    own_class = str(header.get("SOPClassUID", "") or "").strip()
    own_instance = str(header.get("SOPInstanceUID", "") or "").strip()
    if not own_class or not own_instance:
        return None  # store_file_bytes reports what is missing
    if sop_class and own_class != sop_class:
        return f"SOP Class differs from the {envelope}'s: {own_class}"
    if sop_instance and own_instance != sop_instance:
        return f"SOP Instance UID differs from the {envelope}'s"
    return None


_PREAMBLE_AND_PREFIX = 132
_UNDEFINED_LENGTH = 0xFFFFFFFF


def _check_whole(data: bytes | memoryview, ds: Dataset) -> None:
    """Raise UnreadableDatasetError unless every element after the file meta is complete."""
    meta = ds.file_meta
    group_length = meta.get("FileMetaInformationGroupLength")
    if group_length is None:
        raise UnreadableDatasetError("cannot parse dataset: no file meta group length")
    transfer_syntax = UID(str(meta.get("TransferSyntaxUID", "")))
    if not transfer_syntax.is_transfer_syntax:
        raise UnreadableDatasetError("cannot parse dataset: unknown transfer syntax")
    body = bytes(data[_PREAMBLE_AND_PREFIX + 12 + int(group_length) :])
    if transfer_syntax.is_deflated:
        try:
            body = zlib.decompress(body, -zlib.MAX_WBITS)
        except zlib.error as exc:
            raise UnreadableDatasetError(f"cannot parse dataset: bad deflate: {exc}") from exc
    if not body:
        raise UnreadableDatasetError("cannot parse dataset: no data elements")
    stream = io.BytesIO(body)
    elements = data_element_generator(
        stream, transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian
    )
    end_of_last_element = 0
    for element in elements:
        value = element.value
        defined = element.length != _UNDEFINED_LENGTH
        if defined and isinstance(value, bytes) and len(value) != element.length:
            raise UnreadableDatasetError(f"cannot parse dataset: element {element.tag} is cut")
        end_of_last_element = stream.tell()
    if end_of_last_element != len(body):
        raise UnreadableDatasetError("cannot parse dataset: it ends inside an element")


class Archive:
    """The file store and the index, kept consistent with each other."""

    def __init__(
        self,
        files: FileStore,
        engine: Engine,
        *,
        duplicate_policy: str = "replace",
        decide_job: JobDecision | None = None,
    ) -> None:
        if duplicate_policy not in DUPLICATE_POLICIES:
            raise ValueError(f"duplicate_policy: {duplicate_policy!r} not in {DUPLICATE_POLICIES}")
        self.files = files
        self.engine = engine
        self._writer = IndexWriter()
        self.duplicate_policy = duplicate_policy
        self.decide_job = decide_job
        # One index writer at a time per process keeps SQLite free of busy retries; file
        # writes and their fsyncs happen before the lock is taken, in parallel.
        self._index_lock = threading.Lock()

    def store_file_bytes(
        self,
        data: bytes | memoryview,
        *,
        calling_ae: str = "",
        is_result: bool = False,
        header: Dataset | None = None,
    ) -> StoreOutcome:
        """Store a complete DICOM file (preamble, file meta, dataset) given as bytes."""
        ds = header if header is not None else read_header(data)
        meta = getattr(ds, "file_meta", None)
        transfer_syntax = str(getattr(meta, "TransferSyntaxUID", "") or "")
        record = HeaderRecord.from_dataset(ds, transfer_syntax)
        try:
            check_uid("SOPClassUID", record.sop_class_uid)
            relative = self.files.relative_path(
                record.study_instance_uid, record.series_instance_uid, record.sop_instance_uid
            )
        except InvalidUIDError as exc:
            raise InvalidDatasetError(str(exc)) from exc

        if self.duplicate_policy == "keep-first":
            existing = self._existing_path(record.sop_instance_uid)
            if existing is not None:
                log.info("duplicate SOP %s kept first copy", record.sop_instance_uid)
                return StoreOutcome(record, existing, len(data), "kept-first")

        self.files.write_atomic(relative, data)
        try:
            previous = self._index(record, relative, len(data), calling_ae, is_result)
        except BaseException:
            if not self._indexed_path_is(record.sop_instance_uid, relative):
                self.files.remove(relative)
            raise
        if previous is not None and previous != relative:
            self.files.remove(previous)
        return StoreOutcome(record, relative, len(data), "replaced" if previous else "stored")

    def store_dataset(self, ds: Dataset, *, is_result: bool = True) -> StoreOutcome:
        """Store a dataset built in memory (the node's own results) as a file.

        The dataset is its own header: the bytes just written are not parsed back.
        """
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return self.store_file_bytes(buffer.getbuffer(), is_result=is_result, header=ds)

    def path_of(self, relative: str) -> Path:
        return self.files.absolute(relative)

    def _existing_path(self, sop_instance_uid: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.scalar(_SELECT_FILE_PATH, {"sop": sop_instance_uid})

    def _indexed_path_is(self, sop_instance_uid: str, relative: str) -> bool:
        """True if the index already points at `relative` (a replaced copy's path)."""
        try:
            return self._existing_path(sop_instance_uid) == relative
        except Exception:
            return True  # when in doubt, keep the file: an orphan is safer than a hole

    def _index(
        self,
        record: HeaderRecord,
        relative: str,
        size: int,
        calling_ae: str,
        is_result: bool,
    ) -> str | None:
        """Index `record` and commit; returns the path a replaced copy had, else None."""
        received_at: datetime = utcnow()
        for attempt in range(3):
            try:
                with self._index_lock:
                    try:
                        with self.engine.begin() as conn:
                            previous = self._writer.upsert(
                                conn,
                                record,
                                file_path=relative,
                                file_size=size,
                                received_at=received_at,
                                calling_ae=calling_ae,
                                is_result=is_result,
                            )
                            self._enqueue_job(conn, record, calling_ae, is_result)
                    except BaseException:
                        self._writer.rolled_back()
                        raise
                    self._writer.committed()
                return previous
            except IntegrityError:
                # Another process inserted the same patient/study/series first: go again,
                # this time the row exists and is updated.
                if attempt == 2:
                    raise
        return None

    def _enqueue_job(
        self, conn: Connection, record: HeaderRecord, calling_ae: str, is_result: bool
    ) -> None:
        if self.decide_job is None:
            return
        decision = self.decide_job(record, is_result)
        if decision is None:
            return
        exists = conn.scalar(_SELECT_JOB, {"sop": record.sop_instance_uid})
        if exists is not None:
            return  # a replaced copy is not analysed a second time
        state, reason = decision
        conn.execute(
            _INSERT_JOB,
            {
                "sop_instance_uid": record.sop_instance_uid,
                "state": state,
                "reason": reason,
                "calling_ae": calling_ae,
                "created_at": utcnow(),
                "finished_at": utcnow() if state is JobState.SKIPPED else None,
            },
        )
