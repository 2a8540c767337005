"""The job tables, as a person reading them with ``sqlite3`` or ``psql`` sees them.

- ``jobs``: one row a job; ``status`` is plain text, times are UTC, the latest failed attempt's
  error is in ``error_type``/``error_message``/``error_traceback``; a running job carries a lease
  (``lease_owner``, ``lease_expires_at``) that its worker renews.
- ``job_inputs``: the input data of a job (JSON records, or Parquet).
- ``job_results``: the result of a succeeded job, written once, with the status change.
- ``job_events``: every status a job entered, with the attempt and that attempt's error.
- ``job_counts``: how many jobs each owner has in each status, kept by triggers on ``jobs``.

The schema is made only by the Alembic migrations; ``alembic check`` compares it with this module.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from jobsvc.lifecycle import JobStatus

# The conditions of the partial indexes below, written out with their values: a query must
# carry the same condition, with literals rather than bound parameters, for the planner (of
# SQLite and of PostgreSQL's generic plans) to see that the index applies.
IS_WAITING = "status IN ('queued', 'retrying')"
IS_RUNNING = "status = 'running'"
IS_FINISHED = "status IN ('succeeded', 'failed', 'cancelled')"


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in Python; UTC on disk (text on SQLite, timestamptz on PostgreSQL)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        # SQLite stores text: keep it free of an offset so every row reads the same.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON()}


_STATUS_LIST = ", ".join(f"'{s.value}'" for s in JobStatus)
# A 64-bit id on PostgreSQL; SQLite's rowid alias must be declared INTEGER exactly.
EventId = BigInteger().with_variant(Integer(), "sqlite")


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    # The API key that submitted the job ('' when the service runs without keys).
    owner: Mapped[str] = mapped_column(String(64), server_default="")
    task: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))
    priority: Mapped[int] = mapped_column(Integer, server_default="0")
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    max_attempts: Mapped[int] = mapped_column(Integer)
    timeout_seconds: Mapped[float | None] = mapped_column(Float)
    # The first retry waits about this long; each later one twice the one before (capped).
    retry_delay_seconds: Mapped[float] = mapped_column(Float)
    # The earliest time the job may (next) be claimed: the submit's run_at, or a retry's backoff.
    run_at: Mapped[datetime]
    created_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    updated_at: Mapped[datetime]
    progress: Mapped[float | None] = mapped_column(Float)
    error_type: Mapped[str | None] = mapped_column(String(200))
    error_message: Mapped[str | None] = mapped_column(Text)
    error_traceback: Mapped[str | None] = mapped_column(Text)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None]
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (
        CheckConstraint(f"status IN ({_STATUS_LIST})", name="status"),
        CheckConstraint("progress IS NULL OR (progress >= 0 AND progress <= 1)", name="progress"),
        UniqueConstraint("owner", "idempotency_key"),
        # The claim: the first waiting job by priority and due time, found without sorting
        # however many wait; finished jobs are not in it at all.
        Index(
            "ix_jobs_due",
            "priority",
            "run_at",
            "id",
            sqlite_where=text(IS_WAITING),
            postgresql_where=text(IS_WAITING),
        ),
        # The rescuer: running jobs and their lease owners.
        Index(
            "ix_jobs_running",
            "lease_owner",
            sqlite_where=text(IS_RUNNING),
            postgresql_where=text(IS_RUNNING),
        ),
        # The list, newest first, for each filter (owner always; status, task, both): each
        # index gives its rows in id order, so a page reads its rows and stops, where an index
        # on the filter alone read every match and sorted them (456 ms for the first page of
        # 1,000,000 finished jobs on SQLite).
        Index(None, "owner", "id"),
        Index(None, "owner", "status", "id"),
        Index(None, "owner", "task", "id"),
        Index(None, "owner", "status", "task", "id"),
        # Retention: the finished jobs, oldest first, so a prune reads only what it deletes.
        Index(
            "ix_jobs_finished",
            "finished_at",
            sqlite_where=text(IS_FINISHED),
            postgresql_where=text(IS_FINISHED),
        ),
    )


class JobInput(Base):
    __tablename__ = "job_inputs"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    # 'json' (a list of records), 'parquet', 'call' (a function's arguments); with ``path``,
    # an upload kept as it came ('csv', 'ndjson', 'parquet') or, from before uploads were kept
    # so, 'arrow' (an Arrow IPC file).
    format: Mapped[str] = mapped_column(String(16))
    # The input itself, or NULL when it is the file named by ``path``.
    data: Mapped[bytes | None] = mapped_column(LargeBinary)
    # A file in the files directory (JOBSVC_FILES_DIR; on SQLite, "<database>.files").
    path: Mapped[str | None] = mapped_column(String(255))
    rows: Mapped[int] = mapped_column(Integer)
    columns: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(BigInteger)


class JobResult(Base):
    __tablename__ = "job_results"

    # One result a job: the primary key is what makes "stored once" hold.
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer)
    # 'dataframe' (Parquet in data, or an Arrow file named by path), 'json' (a dict in value)
    # or 'none'.
    kind: Mapped[str] = mapped_column(String(16))
    data: Mapped[bytes | None] = mapped_column(LargeBinary)
    path: Mapped[str | None] = mapped_column(String(255))
    value: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    rows: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime]


class JobEvent(Base):
    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(EventId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime]
    status: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str | None] = mapped_column(String(200))
    error_type: Mapped[str | None] = mapped_column(String(200))
    error_message: Mapped[str | None] = mapped_column(Text)
    error_traceback: Mapped[str | None] = mapped_column(Text)


class JobCount(Base):
    """How many jobs an owner has in a status: the sum of ``n`` over the rows of that owner
    and status.

    Triggers on ``jobs`` (made by migration 0005) add a row for every insert, delete and
    status change, in the transaction that makes it: +1 for the status entered, -1 for the
    one left. Rows are only ever added, so concurrent writers never wait for one another
    here (one row per status, updated in place, would serialise every transaction of every
    instance); ``repository.fold_counts`` now and then replaces them by one row per owner and
    status. Counting the jobs themselves read the whole table (197 ms for 1,000,000 jobs).
    """

    __tablename__ = "job_counts"

    id: Mapped[int] = mapped_column(EventId, primary_key=True, autoincrement=True)
    owner: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    n: Mapped[int] = mapped_column(Integer)


# The tables as Core objects, for the repository's statements.
jobs = cast(Table, Job.__table__)
job_inputs = cast(Table, JobInput.__table__)
job_results = cast(Table, JobResult.__table__)
job_events = cast(Table, JobEvent.__table__)
job_counts = cast(Table, JobCount.__table__)
