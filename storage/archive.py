"""Store one DICOM instance: validate its header, write the file, index it, commit.

This is the single path by which anything enters the archive: C-STORE, `pneumonode
import` and the node's own results all go through `Archive.store_file_bytes`, so every
instance obeys the same rules. When it returns, the file and its index row are durable
(fsync + commit), which is when the Storage SCP may answer Success.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from sqlalchemy import Connection, Engine, bindparam, insert, select
from sqlalchemy.exc import IntegrityError

from storage.database import WriterTurns
from storage.errors import IdentityConflictError, InvalidDatasetError
from storage.filestore import FileStore, InvalidUIDError, check_uid
from storage.indexer import HeaderRecord, IndexWriter, insert_if_absent
from storage.intake import IntakeChecks, inspect_instance
from storage.models import AnalysisJob, IdentityConflict, Instance, JobState, utcnow

log = logging.getLogger(__name__)

DUPLICATE_POLICIES = ("replace", "keep-first")
IDENTITY_CONFLICT_POLICIES = ("refuse", "accept")

# Decides, inside the storing transaction, whether an instance gets an analysis job:
# returns None (no job), or (JobState.QUEUED | JobState.SKIPPED, reason).
JobDecision = Callable[[HeaderRecord, bool], tuple[JobState, str] | None]


# Built once, run with parameters (see storage.indexer: cheaper than literal statements).
_SELECT_FILE_PATH = select(Instance.file_path).where(Instance.sop_instance_uid == bindparam("sop"))
_SELECT_JOB = select(AnalysisJob.id).where(AnalysisJob.sop_instance_uid == bindparam("sop"))
_INSERT_JOB = insert(AnalysisJob)
_INSERT_CONFLICT = insert(IdentityConflict)


@dataclass
class _IndexRequest:
    """One instance waiting to be indexed, and, once its transaction ended, the outcome."""

    record: HeaderRecord
    relative: str
    size: int
    checksum: str
    calling_ae: str
    is_result: bool
    received_at: datetime
    done: bool = False
    previous: str | None = None  # the path a replaced copy had
    accepted: list[IdentityConflictError] = field(default_factory=list)
    error: BaseException | None = None


@dataclass(frozen=True)
class StoreOutcome:
    """What happened to one instance offered to the archive."""

    record: HeaderRecord
    relative_path: str
    file_size: int
    action: str  # "stored", "replaced" or "kept-first"


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


class Archive:
    """The file store and the index, kept consistent with each other."""

    def __init__(
        self,
        files: FileStore,
        engine: Engine,
        *,
        duplicate_policy: str = "replace",
        decide_job: JobDecision | None = None,
        checks: IntakeChecks | None = None,
        identity_conflicts: str = "refuse",
    ) -> None:
        if duplicate_policy not in DUPLICATE_POLICIES:
            raise ValueError(f"duplicate_policy: {duplicate_policy!r} not in {DUPLICATE_POLICIES}")
        if identity_conflicts not in IDENTITY_CONFLICT_POLICIES:
            raise ValueError(
                f"identity_conflicts: {identity_conflicts!r} not in {IDENTITY_CONFLICT_POLICIES}"
            )
        self.files = files
        self.engine = engine
        self.checks = checks or IntakeChecks()
        self._writer = IndexWriter(refuse_conflicts=identity_conflicts == "refuse")
        self.duplicate_policy = duplicate_policy
        self.decide_job = decide_job
        # One index writer at a time per process keeps SQLite free of busy retries; file
        # writes and their fsyncs happen before the lock is taken, in parallel. Instances
        # waiting for the lock are committed together by whoever takes it (group commit).
        self._index_lock = threading.Lock()
        self._waiting_lock = threading.Lock()
        self._waiting: list[_IndexRequest] = []
        # Across processes, the index lock's holders queue on the database's writer turns
        # (storage.database.WriterTurns), not in SQLite's sleeping busy handler.
        self._turns = WriterTurns(engine)

    def inspect(
        self,
        data: bytes | memoryview,
        *,
        known_meta: tuple[FileMetaDataset, int] | None = None,
    ) -> Dataset:
        """The header of `data` once it is known to read back (storage.intake), else a
        StoreError naming why not; `known_meta` as storage.intake.inspect_instance takes it."""
        return inspect_instance(data, self.checks, known_meta=known_meta)

    def store_file_bytes(
        self,
        data: bytes | memoryview,
        *,
        calling_ae: str = "",
        is_result: bool = False,
        header: Dataset | None = None,
    ) -> StoreOutcome:
        """Store a complete DICOM file (preamble, file meta, dataset) given as bytes.

        `header` is what `inspect` returned for these bytes (or the dataset the node built
        them from); without it the bytes are inspected here.
        """
        ds = header if header is not None else self.inspect(data)
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

        checksum = hashlib.sha256(data).hexdigest()
        # Never over an existing file: a replaced copy stays whole until the index points
        # at the new one, so the index always describes the bytes on disk.
        relative = self.files.write_new(relative, data)
        try:
            previous = self._index(record, relative, len(data), checksum, calling_ae, is_result)
        except IdentityConflictError as conflict:
            self.files.remove(relative)
            self._record_conflict(record, conflict, "refused", calling_ae)
            raise
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
        checksum: str,
        calling_ae: str,
        is_result: bool,
    ) -> str | None:
        """Index `record` and commit; returns the path a replaced copy had, else None.

        Group commit: instances stored at the same time by other associations of this
        process are indexed in the same transaction, so one commit (one fsync of the
        SQLite log) serves all of them instead of each waiting for the one before. The
        thread that gets the index lock commits everything waiting; each caller returns
        once its own row is committed.
        """
        request = _IndexRequest(
            record, relative, size, checksum, calling_ae, is_result, received_at=utcnow()
        )
        with self._waiting_lock:
            self._waiting.append(request)
        with self._index_lock:
            if not request.done:
                with self._waiting_lock:
                    batch, self._waiting = self._waiting, []
                self._commit_batch(batch)
        if request.error is not None:
            raise request.error
        for conflict in request.accepted:
            log.warning(
                "accepted SOP %s from %s although %s",
                record.sop_instance_uid,
                calling_ae,
                conflict,
            )
        return request.previous

    def _commit_batch(self, batch: list[_IndexRequest]) -> None:
        """All of `batch` in one transaction; if that fails, each in its own, so that one
        instance's refusal (an identity conflict, a lost race) is its own alone."""
        if len(batch) > 1:
            try:
                self._write_rows(batch)
                return
            except Exception:
                pass
        for request in batch:
            for attempt in range(3):
                try:
                    self._write_rows([request])
                    break
                except IntegrityError as exc:
                    # Another process inserted the same patient/study/series first: go
                    # again, this time the row exists and is updated.
                    if attempt == 2:
                        request.error = exc
                except BaseException as exc:
                    request.error = exc
                    break
            request.done = True

    def _write_rows(self, batch: list[_IndexRequest]) -> None:
        """Index every request of `batch` and commit them together."""
        outcomes: list[tuple[str | None, list[IdentityConflictError]]] = []
        try:
            with self._turns.turn(), self.engine.begin() as conn:
                for request in batch:
                    accepted: list[IdentityConflictError] = []
                    previous = self._writer.upsert(
                        conn,
                        request.record,
                        file_path=request.relative,
                        file_size=request.size,
                        file_sha256=request.checksum,
                        received_at=request.received_at,
                        calling_ae=request.calling_ae,
                        is_result=request.is_result,
                        conflicts=accepted,
                    )
                    for conflict in accepted:
                        self._insert_conflict(
                            conn, request.record, conflict, "accepted", request.calling_ae
                        )
                    self._enqueue_job(conn, request.record, request.calling_ae, request.is_result)
                    outcomes.append((previous, accepted))
        except BaseException:
            self._writer.rolled_back()
            raise
        self._writer.committed()
        for request, (previous, accepted) in zip(batch, outcomes, strict=True):
            request.previous = previous
            request.accepted = accepted
            request.done = True

    @staticmethod
    def _insert_conflict(
        conn: Connection,
        record: HeaderRecord,
        conflict: IdentityConflictError,
        action: str,
        calling_ae: str,
    ) -> None:
        conn.execute(
            _INSERT_CONFLICT,
            {
                "sop_instance_uid": record.sop_instance_uid,
                "level": conflict.level,
                "conflicting_uid": conflict.uid,
                "action": action,
                "calling_ae": calling_ae,
                "recorded_at": utcnow(),
            },
        )

    def _record_conflict(
        self, record: HeaderRecord, conflict: IdentityConflictError, action: str, calling_ae: str
    ) -> None:
        """Count a refused conflict; the refusal stands even if counting fails."""
        try:
            with self._index_lock, self._turns.turn(), self.engine.begin() as conn:
                self._insert_conflict(conn, record, conflict, action, calling_ae)
        except Exception:
            log.exception("cannot record the identity conflict of SOP %s", record.sop_instance_uid)

    def _enqueue_job(
        self, conn: Connection, record: HeaderRecord, calling_ae: str, is_result: bool
    ) -> None:
        if self.decide_job is None:
            return
        decision = self.decide_job(record, is_result)
        if decision is None:
            return
        state, reason = decision
        row = {
            "sop_instance_uid": record.sop_instance_uid,
            "state": state,
            "reason": reason,
            "calling_ae": calling_ae,
            "created_at": utcnow(),
            "finished_at": utcnow() if state is JobState.SKIPPED else None,
        }
        # A replaced copy is not analysed a second time: its job exists already.
        add_job = insert_if_absent(conn.dialect, AnalysisJob.__table__, "sop_instance_uid")
        if add_job is not None:
            conn.execute(add_job, row)
        elif conn.scalar(_SELECT_JOB, {"sop": record.sop_instance_uid}) is None:
            conn.execute(_INSERT_JOB, row)
