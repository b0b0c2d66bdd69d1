"""The schema of release 529bd48, the last one without schema versions, frozen here for
revision 0001_baseline: storage/models.py moves on, this must not.

On an empty database it is created as it stands. An index that release, or an older one,
wrote has no version yet: it is completed to this schema, which is what every start of
those releases did (missing tables, nullable columns and indexes added, folded person names
filled in), plus what they could not do: the NOT NULL acquisition_date_time column that
releases before 9fc8de6 lack, and the instance_attribute indexes that 5b7d822 replaced.
"""

from __future__ import annotations

from alembic.operations import Operations
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    inspect,
    select,
    update,
)

from storage.text import fold_case

UID = String(64)
JOB_STATES = ("queued", "claimed", "done", "failed", "skipped")
DELIVERY_STATES = ("pending", "delivered", "failed")

metadata = MetaData()

patient = Table(
    "patient",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("patient_id", String(64), nullable=False, unique=True),
    Column("patient_name", String(324), nullable=False, index=True),
    Column("patient_name_folded", String(324), index=True),
    Column("patient_birth_date", String(8), nullable=False, index=True),
    Column("patient_sex", String(16), nullable=False, index=True),
)

study = Table(
    "study",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("patient_pk", Integer, ForeignKey("patient.id"), nullable=False, index=True),
    Column("study_instance_uid", UID, nullable=False, unique=True),
    Column("study_date", String(8), nullable=False, index=True),
    Column("study_time", String(16), nullable=False, index=True),
    Column("accession_number", String(16), nullable=False, index=True),
    Column("study_id", String(16), nullable=False, index=True),
    Column("study_description", String(64), nullable=False, index=True),
    Column("referring_physician_name", String(324), nullable=False, index=True),
    Column("referring_physician_name_folded", String(324), index=True),
)

series = Table(
    "series",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("study_pk", Integer, ForeignKey("study.id"), nullable=False, index=True),
    Column("series_instance_uid", UID, nullable=False, unique=True),
    Column("modality", String(16), nullable=False, index=True),
    Column("series_number", Integer, index=True),
    Column("series_description", String(64), nullable=False, index=True),
    Column("body_part_examined", String(16), nullable=False, index=True),
)

instance = Table(
    "instance",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("series_pk", Integer, ForeignKey("series.id"), nullable=False, index=True),
    Column("sop_instance_uid", UID, nullable=False, unique=True),
    Column("sop_class_uid", UID, nullable=False, index=True),
    Column("instance_number", Integer, index=True),
    Column("transfer_syntax_uid", UID, nullable=False, index=True),
    Column("rows", Integer),
    Column("columns", Integer),
    Column("number_of_frames", Integer),
    Column("samples_per_pixel", Integer),
    Column("photometric_interpretation", String(16), nullable=False),
    Column("acquisition_date_time", String(26), nullable=False, index=True),
    Column("specific_character_set", String(128), nullable=False),
    Column("file_path", Text, nullable=False),
    Column("file_size", BigInteger, nullable=False),
    Column("file_sha256", String(64)),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("calling_ae", String(16), nullable=False, index=True),
    Column("is_result", Boolean, nullable=False),
)

instance_attribute = Table(
    "instance_attribute",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("instance_pk", Integer, ForeignKey("instance.id"), nullable=False),
    Column("tag", BigInteger, nullable=False),
    Column("vr", String(2), nullable=False),
    Column("position", Integer, nullable=False),
    Column("value", Text, nullable=False),
    Column("folded", Text),
    Index("ix_instance_attribute_instance_tag", "instance_pk", "tag"),
)

identity_conflict = Table(
    "identity_conflict",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("sop_instance_uid", UID, nullable=False),
    Column("level", String(16), nullable=False),
    Column("conflicting_uid", UID, nullable=False, index=True),
    Column("action", String(16), nullable=False),
    Column("calling_ae", String(16), nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
)

analysis_job = Table(
    "analysis_job",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("sop_instance_uid", UID, nullable=False, unique=True),
    Column(
        "state",
        Enum(*JOB_STATES, name="jobstate", native_enum=False, length=16),
        nullable=False,
        index=True,
    ),
    Column("reason", Text, nullable=False),
    Column("calling_ae", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("claimed_by", String(128), nullable=False),
    Column("claimed_at", DateTime(timezone=True)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
    Column("probability", Float),
    Column("label", String(64), nullable=False),
    Column("sc_sop_instance_uid", UID, nullable=False),
    Column("sr_sop_instance_uid", UID, nullable=False),
)

delivery = Table(
    "delivery",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("sop_instance_uid", UID, nullable=False),
    Column("destination_ae", String(16), nullable=False),
    Column(
        "state",
        Enum(*DELIVERY_STATES, name="deliverystate", native_enum=False, length=16),
        nullable=False,
    ),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("last_error", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("delivered_at", DateTime(timezone=True)),
    UniqueConstraint("sop_instance_uid", "destination_ae"),
    Index("ix_delivery_due", "state", "next_attempt_at"),
)

# NOT NULL columns that releases before 529bd48 lacked, with the value existing rows get.
LATER_NOT_NULL = {("instance", "acquisition_date_time"): ""}

# Indexes of earlier releases that 529bd48 no longer has (5b7d822 replaced them by one).
OBSOLETE_INDEXES = {
    "instance_attribute": (
        "ix_instance_attribute_instance_pk",
        "ix_instance_attribute_tag_value",
        "ix_instance_attribute_tag_folded",
    ),
}


def create(operations: Operations) -> None:
    """Create the baseline schema on an empty database, or complete an index written by
    that release or an older one (see the module docstring)."""
    conn = operations.get_bind()
    present = set(inspect(conn).get_table_names())
    metadata.create_all(conn, tables=[t for t in metadata.sorted_tables if t.name not in present])
    for table in metadata.sorted_tables:
        if table.name in present:
            _complete_table(operations, conn, table)
    _fill_folded_names(conn)


def _complete_table(operations: Operations, conn: Connection, table: Table) -> None:
    inspector = inspect(conn)
    columns = {column["name"] for column in inspector.get_columns(table.name)}
    for column in table.columns:
        if column.name in columns:
            continue
        fill = None
        if not column.nullable:
            fill = LATER_NOT_NULL.get((table.name, column.name))
            if fill is None:
                raise RuntimeError(
                    f"the index lacks {table.name}.{column.name}, which no release left out"
                )
        added = Column(column.name, column.type, nullable=column.nullable, server_default=fill)
        operations.add_column(table.name, added)
    indexes = {index["name"] for index in inspector.get_indexes(table.name)}
    for name in OBSOLETE_INDEXES.get(table.name, ()):
        if name in indexes:
            operations.drop_index(name, table_name=table.name)
    for index in table.indexes:
        if index.name not in indexes:
            index.create(conn)


def _fill_folded_names(conn: Connection) -> None:
    """Fold the person names of rows indexed before the folded columns existed (e301c25)."""
    for table, name, folded in (
        (patient, "patient_name", "patient_name_folded"),
        (study, "referring_physician_name", "referring_physician_name_folded"),
    ):
        rows = conn.execute(select(table.c.id, table.c[name]).where(table.c[folded].is_(None)))
        updates = [{"pk_": pk, "folded_": fold_case(value or "")} for pk, value in rows]
        if updates:
            statement = (
                update(table)
                .where(table.c.id == bindparam("pk_"))
                .values({folded: bindparam("folded_")})
            )
            conn.execute(statement, updates)
