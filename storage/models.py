"""The index schema: patient / study / series / instance, plus the durable work tables.

Normalised along the DICOM information model so that C-FIND at each level is a query on
one table joined upwards. Columns that queries match on carry an index. Values are kept as
DICOM gives them (DA as YYYYMMDD, TM as HHMMSS.FFFFFF text), which sort and compare
correctly as strings; numeric attributes (IS, US) are integers.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

UID_LENGTH = 64


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Patient(Base):
    __tablename__ = "patient"

    id: Mapped[int] = mapped_column(primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), unique=True)
    patient_name: Mapped[str] = mapped_column(String(324), default="", index=True)
    # storage.text.fold_case(patient_name): case-insensitive matching that uses an index.
    patient_name_folded: Mapped[str | None] = mapped_column(String(324), index=True)
    patient_birth_date: Mapped[str] = mapped_column(String(8), default="", index=True)
    patient_sex: Mapped[str] = mapped_column(String(16), default="", index=True)

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    __tablename__ = "study"

    id: Mapped[int] = mapped_column(primary_key=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patient.id"), index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    study_date: Mapped[str] = mapped_column(String(8), default="", index=True)
    study_time: Mapped[str] = mapped_column(String(16), default="", index=True)
    accession_number: Mapped[str] = mapped_column(String(16), default="", index=True)
    study_id: Mapped[str] = mapped_column(String(16), default="", index=True)
    study_description: Mapped[str] = mapped_column(String(64), default="", index=True)
    referring_physician_name: Mapped[str] = mapped_column(String(324), default="", index=True)
    referring_physician_name_folded: Mapped[str | None] = mapped_column(String(324), index=True)

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    modality: Mapped[str] = mapped_column(String(16), default="", index=True)
    series_number: Mapped[int | None] = mapped_column(Integer, index=True)
    series_description: Mapped[str] = mapped_column(String(64), default="", index=True)
    body_part_examined: Mapped[str] = mapped_column(String(16), default="", index=True)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instance"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LENGTH), index=True)
    instance_number: Mapped[int | None] = mapped_column(Integer, index=True)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(UID_LENGTH), index=True)
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    number_of_frames: Mapped[int | None] = mapped_column(Integer)
    samples_per_pixel: Mapped[int | None] = mapped_column(Integer)
    photometric_interpretation: Mapped[str] = mapped_column(String(16), default="")
    # DT as DICOM writes it (YYYYMMDDHHMMSS.FFFFFF&ZZXX): the IMAGE-level DT key of C-FIND.
    acquisition_date_time: Mapped[str] = mapped_column(String(26), default="", index=True)
    specific_character_set: Mapped[str] = mapped_column(String(128), default="")
    file_path: Mapped[str] = mapped_column(Text)
    file_size: Mapped[int] = mapped_column(BigInteger)
    # SHA-256 of the file's bytes at ingest (hex), for `pneumonode verify`; None for rows
    # indexed before the column existed.
    file_sha256: Mapped[str | None] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    calling_ae: Mapped[str] = mapped_column(String(16), default="", index=True)
    # True for the Secondary Captures and Structured Reports this node made itself.
    is_result: Mapped[bool] = mapped_column(default=False)

    series: Mapped[Series] = relationship(back_populates="instances")


class InstanceAttribute(Base):
    """One value of a top-level attribute of an instance that the columns above do not hold
    (PatientAge, ViewPosition, Laterality, ...): C-FIND matches on it and returns it.

    A row per value (position in a multi-valued attribute), its text as DICOM writes it;
    person names also folded for case-insensitive matching. Sequences and bulk data (OB, OW,
    UN, ...) are not kept; the file has them.
    """

    __tablename__ = "instance_attribute"
    # Queries reach these rows through their instance (a few dozen rows each), never by
    # value across the table: one index, so each stored instance writes one entry per row.
    __table_args__ = (Index("ix_instance_attribute_instance_tag", "instance_pk", "tag"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    instance_pk: Mapped[int] = mapped_column(ForeignKey("instance.id"))
    tag: Mapped[int] = mapped_column(BigInteger)
    vr: Mapped[str] = mapped_column(String(2))
    position: Mapped[int] = mapped_column(Integer, default=0)
    value: Mapped[str] = mapped_column(Text)
    folded: Mapped[str | None] = mapped_column(Text)


class IdentityConflict(Base):
    """An instance that named another parent for a study or series the index holds.

    Kept whether the instance was refused or accepted (storage.identity_conflicts), so
    that `status` can count them; no patient names or IDs, only UIDs.
    """

    __tablename__ = "identity_conflict"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    level: Mapped[str] = mapped_column(String(16))  # "study" or "series"
    conflicting_uid: Mapped[str] = mapped_column(String(UID_LENGTH), index=True)
    action: Mapped[str] = mapped_column(String(16))  # "refused" or "accepted"
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class JobState(enum.StrEnum):
    QUEUED = "queued"
    CLAIMED = "claimed"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


class AnalysisJob(Base):
    """One per received instance that could be analysed: the durable analysis queue.

    The unique instance key is what makes "never analysed twice" hold across restarts.
    """

    __tablename__ = "analysis_job"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    state: Mapped[JobState] = mapped_column(
        Enum(
            JobState, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e]
        ),
        index=True,
    )
    reason: Mapped[str] = mapped_column(Text, default="")
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    claimed_by: Mapped[str] = mapped_column(String(128), default="")
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    probability: Mapped[float | None] = mapped_column(Float)
    label: Mapped[str] = mapped_column(String(64), default="")


class ResultState(enum.StrEnum):
    STORED = "stored"  # built and stored (and queued for delivery, if it goes anywhere)
    NOT_MADE = "not_made"  # the kind had nothing to say for this image (`reason` says why)
    FAILED = "failed"  # could not be built or stored (`reason` says why)


class JobResult(Base):
    """One result object of one analysed image: its kind (`ai.results.<kind>`), what became
    of it, and its SOP Instance UID when it was stored.

    One row per job and kind, so that a kind added later needs no new column, and a kind
    that failed fails alone.
    """

    __tablename__ = "job_result"
    __table_args__ = (UniqueConstraint("job_pk", "kind"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_pk: Mapped[int] = mapped_column(ForeignKey("analysis_job.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[ResultState] = mapped_column(
        Enum(
            ResultState,
            native_enum=False,
            length=16,
            values_callable=lambda e: [m.value for m in e],
        ),
        index=True,
    )
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), default="", index=True)
    reason: Mapped[str] = mapped_column(Text, default="")


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class Delivery(Base):
    """One C-STORE of a result instance to one destination AE, retried until it lands."""

    __tablename__ = "delivery"
    __table_args__ = (
        UniqueConstraint("sop_instance_uid", "destination_ae"),
        Index("ix_delivery_due", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    destination_ae: Mapped[str] = mapped_column(String(16))
    state: Mapped[DeliveryState] = mapped_column(
        Enum(
            DeliveryState,
            native_enum=False,
            length=16,
            values_callable=lambda e: [m.value for m in e],
        )
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
