"""Every statement that touches the job tables.

Callers pass a connection inside a transaction (``Database.write()``/``read()``); nothing here
commits. Writes that belong to a running attempt are fenced: they match only while the job is
``running`` under the same lease owner and attempt number, so a worker presumed dead that comes
back late changes nothing. The claim is one statement: an ``UPDATE`` of the first due job,
selected ``FOR UPDATE SKIP LOCKED`` where the database has it (PostgreSQL); on SQLite the
``BEGIN IMMEDIATE`` transaction already holds the only write lock.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections import namedtuple
from collections.abc import Callable, Collection, Sequence
from datetime import UTC, datetime
from functools import cache
from operator import itemgetter
from typing import Any, cast

from sqlalchemy import (
    CompoundSelect,
    Dialect,
    Integer,
    Row,
    Select,
    String,
    Table,
    and_,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from jobsvc.lifecycle import (
    AttemptError,
    Decision,
    JobStatus,
    Outcome,
    ResultData,
    Verdict,
    lost_worker_error,
)
from jobsvc.models import (
    IS_FINISHED,
    IS_RUNNING,
    IS_WAITING,
    UTCDateTime,
    job_counts,
    job_events,
    job_inputs,
    job_results,
    jobs,
)
from jobsvc.submission import InputData, NewJob

# PostgreSQL: a NOTIFY on this channel, sent when jobs become due now, wakes every instance.
JOBS_CHANNEL = "jobsvc_jobs"


def utcnow() -> datetime:
    return datetime.now(UTC)


async def announce_due_jobs(conn: AsyncConnection) -> None:
    """Tell other instances there is work now (delivered when the transaction commits)."""
    if conn.dialect.name == "postgresql":
        await conn.execute(select(func.pg_notify(JOBS_CHANNEL, "")))


_id_lock = threading.Lock()
_id_clock = {"ms": 0, "sequence": 0}


def new_job_id() -> str:
    """A UUIDv7 string, monotonic within this process (RFC 9562, 6.2 method 1): ids made in
    the same millisecond count up in ``rand_a``, so ``ORDER BY id`` is the order of creation."""
    with _id_lock:
        ms = time.time_ns() // 1_000_000
        if ms <= _id_clock["ms"]:
            ms = _id_clock["ms"]
            _id_clock["sequence"] += 1
            if _id_clock["sequence"] > 0xFFF:  # 4096 ids in one millisecond: borrow the next
                ms += 1
                _id_clock["sequence"] = 0
        else:
            _id_clock["sequence"] = secrets.randbelow(0x800)  # leave room to count up
        _id_clock["ms"] = ms
        sequence = _id_clock["sequence"]
    random_bits = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = ms << 80 | 0x7 << 76 | sequence << 64 | 0x2 << 62 | random_bits
    hex_ = f"{value:032x}"
    return f"{hex_[:8]}-{hex_[8:12]}-{hex_[12:16]}-{hex_[16:20]}-{hex_[20:]}"


def new_runner_id(host: str) -> str:
    """Unique per process start: host, pid, and a random token so a reused pid never matches."""
    return f"{host}:{os.getpid()}:{secrets.token_hex(4)}"


JobRow = Row[Any]


Events = list[dict[str, Any]]
"""Event rows gathered in a transaction, to be inserted in one statement (``add_events``)."""


async def add_event(
    conn: AsyncConnection,
    job_id: str,
    status: str,
    attempt: int,
    at: datetime,
    *,
    worker: str | None = None,
    error: AttemptError | None = None,
    into: Events | None = None,
) -> None:
    """Record a state change; with ``into``, gather it for ``add_events`` instead."""
    row = {
        "job_id": job_id,
        "at": at,
        "status": status,
        "attempt": attempt,
        "worker": worker,
        **_error_columns(error),
    }
    if into is not None:
        into.append(row)
    else:
        await insert_rows(conn, job_events, [row])


async def add_events(conn: AsyncConnection, rows: Events) -> None:
    if rows:
        await insert_rows(conn, job_events, rows)


async def insert_rows(conn: AsyncConnection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """``INSERT`` of rows that all name the same columns.

    On SQLite the rows are bound as plain tuples, each column's conversion (a time to text, a
    dict to JSON) applied once per distinct value. SQLAlchemy's own work per value made a
    quarter to a third of the CPU of a group commit's transaction: 50-62 µs a job in batches
    of 32, 36-41 µs this way.
    """
    if conn.dialect.name != "sqlite":
        await conn.execute(insert(table), list(rows))
        return
    sql, columns_of, conversions = _sqlite_insert(conn.dialect, table, tuple(rows[0]))
    converted: list[dict[int, Any]] = [{} for _ in conversions]  # id(value) -> bound value
    values = []
    for row in rows:
        bound = list(columns_of(row))
        for (index, process), seen in zip(conversions, converted, strict=True):
            value = bound[index]
            if value is not None:
                key = id(value)  # a batch shares its objects (its time, say)
                if key not in seen:
                    seen[key] = (value, process(value))  # kept: its id stays its own
                bound[index] = seen[key][1]
        values.append(tuple(bound))
    await conn.exec_driver_sql(sql, values)


@cache
def _sqlite_insert(
    dialect: Dialect, table: Table, names: tuple[str, ...]
) -> tuple[str, Callable[[dict[str, Any]], tuple[Any, ...]], list[tuple[int, Any]]]:
    """The statement's text, a row's values in its order, and which of them need converting."""
    compiled = insert(table).compile(dialect=dialect, column_keys=list(names))
    order = tuple(compiled.positiontup or ())
    processors = [
        table.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in order
    ]
    conversions = [(index, p) for index, p in enumerate(processors) if p is not None]
    return compiled.string, _values_of(order), conversions


def _values_of(names: tuple[str, ...]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    if len(names) == 1:  # itemgetter of one name returns the value, not a tuple
        return lambda row: (row[names[0]],)
    return itemgetter(*names)


def _error_columns(error: AttemptError | None) -> dict[str, Any]:
    return {
        "error_type": error.type if error else None,
        "error_message": error.message if error else None,
        "error_traceback": error.traceback if error else None,
    }


_NO_LEASE = {"lease_owner": None, "lease_expires_at": None}


# --- submit and read -------------------------------------------------------------------------


async def insert_jobs(
    conn: AsyncConnection, new: Sequence[tuple[NewJob, InputData | None]], now: datetime
) -> list[JobRow]:
    """Insert jobs, their inputs and their first events: three statements for any number."""
    job_values = []
    input_values = []
    event_values = []
    for job, data in new:
        job_id = job.id or new_job_id()
        job_values.append(
            {
                "id": job_id,
                "owner": job.owner,
                "task": job.task,
                "status": JobStatus.QUEUED,
                "priority": job.priority,
                "params": job.params,
                "attempts": 0,
                "max_attempts": job.max_attempts,
                "timeout_seconds": job.timeout_seconds,
                "retry_delay_seconds": job.retry_delay_seconds,
                "run_at": job.run_at or now,
                "created_at": now,
                "updated_at": now,
                "idempotency_key": job.idempotency_key,
                "request_hash": job.request_hash,
            }
        )
        if data is not None:
            input_values.append(
                {
                    "job_id": job_id,
                    "format": data.format,
                    "data": data.data,
                    "path": data.path,
                    "rows": data.rows,
                    "columns": data.columns,
                    "size_bytes": len(data.data) if data.data is not None else data.size_bytes,
                }
            )
        event_values.append(
            {
                "job_id": job_id,
                "at": now,
                "status": JobStatus.QUEUED,
                "attempt": 0,
                "worker": None,
                "error_type": None,
                "error_message": None,
                "error_traceback": None,
            }
        )
    await insert_rows(conn, jobs, job_values)
    if input_values:
        await insert_rows(conn, job_inputs, input_values)
    await insert_rows(conn, job_events, event_values)
    # Every column is known here: reading the rows back would only cost the hot path a query.
    return [_stored_row(values) for values in job_values]


# A new job's row as a read would return it (columns not inserted are NULL).
_JobRecord = namedtuple("_JobRecord", [column.name for column in jobs.c])  # type: ignore[misc]


def _stored_row(values: dict[str, Any]) -> JobRow:
    run_at: datetime = values["run_at"]
    record = _JobRecord(
        **{**dict.fromkeys(_JobRecord._fields), **values, "run_at": run_at.astimezone(UTC)}
    )
    return cast(JobRow, record)


async def insert_job(
    conn: AsyncConnection, job: NewJob, data: InputData | None, now: datetime
) -> JobRow:
    return (await insert_jobs(conn, [(job, data)], now))[0]


async def get_job(conn: AsyncConnection, job_id: str, owner: str | None = None) -> JobRow | None:
    """The job; with ``owner``, only if it belongs to that owner."""
    query = select(jobs).where(jobs.c.id == job_id)
    if owner is not None:
        query = query.where(jobs.c.owner == owner)
    return (await conn.execute(query)).first()


async def find_by_idempotency_key(conn: AsyncConnection, owner: str, key: str) -> JobRow | None:
    query = select(jobs).where(jobs.c.owner == owner, jobs.c.idempotency_key == key)
    return (await conn.execute(query)).first()


async def list_jobs(
    conn: AsyncConnection,
    *,
    owner: str | None,
    statuses: Collection[str] = (),
    task: str | None = None,
    limit: int = 50,
    before_id: str | None = None,
) -> Sequence[JobRow]:
    """Newest first. Ids are time-ordered, so the cursor is simply the last id seen."""
    rows: Sequence[JobRow] = (
        await conn.execute(page_query(owner, statuses, task, limit, before_id))
    ).all()
    return rows


def page_query(
    owner: str | None,
    statuses: Collection[str],
    task: str | None,
    limit: int,
    before_id: str | None,
) -> Select[Any] | CompoundSelect[Any]:
    """A page of ``list_jobs``. Each filter has an index that ends with the id (``models``),
    so a page reads its rows in order and stops.

    Several statuses make a page of each, merged in id order (an ``IN`` of them could not be
    read in order, and sorted every match instead). Each is a subquery with its own limit:
    PostgreSQL merges only such pages without sorting; SQLite sorts each page's few rows.
    """
    wanted: list[str | None] = [*sorted(set(statuses))] or [None]
    pages = [
        _matching(owner, status, task, before_id).order_by(jobs.c.id.desc()).limit(limit)
        for status in wanted
    ]
    if len(pages) == 1:
        return pages[0]
    merged = union_all(*(select(page.subquery()) for page in pages))
    return merged.order_by(merged.selected_columns.id.desc()).limit(limit)


def _matching(
    owner: str | None, status: str | None, task: str | None, before_id: str | None
) -> Select[Any]:
    query = select(jobs)
    if owner is not None:
        query = query.where(jobs.c.owner == owner)
    if status is not None:
        query = query.where(jobs.c.status == status)
    if task is not None:
        query = query.where(jobs.c.task == task)
    if before_id is not None:
        query = query.where(jobs.c.id < before_id)
    return query


async def list_events(conn: AsyncConnection, job_id: str) -> Sequence[JobRow]:
    query = select(job_events).where(job_events.c.job_id == job_id).order_by(job_events.c.id)
    return (await conn.execute(query)).all()


async def get_result(conn: AsyncConnection, job_id: str) -> JobRow | None:
    query = select(job_results).where(job_results.c.job_id == job_id)
    return (await conn.execute(query)).first()


# --- state changes requested by users --------------------------------------------------------


async def transition(
    conn: AsyncConnection,
    job_id: str,
    *,
    owner: str | None,
    allowed_from: Collection[str],
    status: str,
    now: datetime,
    values: dict[str, Any] | None = None,
) -> JobRow | None:
    """Move the job to ``status`` if it is in one of ``allowed_from``; the new row, or None."""
    query = (
        update(jobs)
        .where(jobs.c.id == job_id, jobs.c.status.in_(allowed_from))
        .values(status=status, updated_at=now, **(values or {}))
        .returning(*jobs.c)
    )
    if owner is not None:
        query = query.where(jobs.c.owner == owner)
    row = (await conn.execute(query)).first()
    if row is not None:
        await add_event(conn, job_id, status, row.attempts, now)
    return row


# --- the runner's side: claim, heartbeat, progress, finish ---------------------------------


# The runner's statements are built once, with bind parameters: SQLAlchemy then reuses their
# cache keys and compiled forms, and a job's transaction only binds values (building the
# statements anew cost more than running them on SQLite).
_AT = bindparam("at", type_=UTCDateTime())
_LEASE_UNTIL = bindparam("lease_until", type_=UTCDateTime())
_FENCE = and_(
    jobs.c.id == bindparam("fence_id", type_=String()),
    jobs.c.status == JobStatus.RUNNING,
    jobs.c.lease_owner == bindparam("fence_worker", type_=String()),
    jobs.c.attempts == bindparam("fence_attempt", type_=Integer()),
)
"""The fence: the job is running this attempt under this worker's lease (see ``_held_by``)."""


def _held_by(job_id: str, worker: str, attempt: int) -> dict[str, Any]:
    return {"fence_id": job_id, "fence_worker": worker, "fence_attempt": attempt}


def _due(due_by: Any, limit: Any) -> Select[tuple[str]]:
    return (
        select(jobs.c.id)
        .where(text(IS_WAITING), jobs.c.run_at <= due_by)
        .order_by(jobs.c.priority, jobs.c.run_at, jobs.c.id)
        .limit(limit)
    )


def due_jobs(now: datetime, limit: int) -> Select[tuple[str]]:
    """The ids of the next ``limit`` due jobs, in claim order (read from ``ix_jobs_due``)."""
    return _due(now, limit)


_STARTED = {
    "status": JobStatus.RUNNING,
    "attempts": jobs.c.attempts + 1,
    "lease_owner": bindparam("claimer", type_=String()),
    "lease_expires_at": _LEASE_UNTIL,
    "started_at": _AT,
    "updated_at": _AT,
    "progress": None,
}
_CLAIM = (
    update(jobs)
    .where(
        jobs.c.id.in_(
            _due(bindparam("due_by", type_=UTCDateTime()), bindparam("claim_limit"))
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        ),
        # Literal SQL: an IN list of parameters is rendered anew at every execution.
        text(IS_WAITING),
    )
    .values(_STARTED)
    .returning(*jobs.c)
)
_INPUTS = select(job_inputs).where(job_inputs.c.job_id.in_(bindparam("ids", expanding=True)))
_INPUT = select(job_inputs).where(job_inputs.c.job_id == bindparam("id"))  # compiled once
_MARK_STARTED = update(jobs).where(_FENCE).values(started_at=_AT)
_SAVE_PROGRESS = (
    update(jobs).where(_FENCE).values(progress=bindparam("new_progress"), updated_at=_AT)
)
_SUCCEED = (
    update(jobs)
    .where(_FENCE)
    .values(
        status=JobStatus.SUCCEEDED,
        finished_at=_AT,
        updated_at=_AT,
        progress=1.0,
        lease_owner=None,
        lease_expires_at=None,
        # The errors of earlier attempts stay in the events; the job itself has none.
        error_type=None,
        error_message=None,
        error_traceback=None,
    )
)
# On PostgreSQL, the fenced status change and the result's insert are one statement: the
# result is inserted only for the row the fence let through.
_SUCCEEDED = _SUCCEED.returning(jobs.c.id).cte("succeeded")
_RESULT_FIELDS = ("attempt", "kind", "data", "value", "rows", "path", "created_at")
_SUCCEED_WITH_RESULT = insert(job_results).from_select(
    ["job_id", *_RESULT_FIELDS],
    select(
        _SUCCEEDED.c.id,
        *(bindparam(f"result_{name}", type_=job_results.c[name].type) for name in _RESULT_FIELDS),
    ),
)


# On PostgreSQL, the claim and the read of the claimed jobs' inputs are one statement (one
# round trip less per job); SQLite cannot put an UPDATE ... RETURNING in a WITH clause.
_CLAIMED = _CLAIM.cte("claimed")
_CLAIM_WITH_INPUTS = select(
    _CLAIMED,
    job_inputs.c.format.label("input_format"),
    job_inputs.c.data.label("input_data"),
    job_inputs.c.path.label("input_path"),
).select_from(_CLAIMED.outerjoin(job_inputs, job_inputs.c.job_id == _CLAIMED.c.id))
_StoredInput = namedtuple("_StoredInput", ["format", "data", "path"])


async def claim_with_inputs(
    conn: AsyncConnection, runner: str, now: datetime, lease_until: datetime, limit: int
) -> list[tuple[JobRow, Any]]:
    """``claim``, with each job's input (``format``, ``data``, ``path``; None without one)."""
    if conn.dialect.name != "postgresql":
        claimed = await claim(conn, runner, now, lease_until, limit)
        inputs = await get_inputs(conn, [job.id for job in claimed]) if claimed else {}
        return [(job, inputs.get(job.id)) for job in claimed]
    rows = (
        await conn.execute(_CLAIM_WITH_INPUTS, _claim_values(runner, now, lease_until, limit))
    ).all()
    await _started(conn, rows, runner, now)
    return [
        (row, _StoredInput(row.input_format, row.input_data, row.input_path))
        if row.input_format is not None
        else (row, None)
        for row in sorted(rows, key=_claim_order)
    ]


def _claim_values(runner: str, now: datetime, lease_until: datetime, limit: int) -> dict[str, Any]:
    return {
        "due_by": now,
        "claim_limit": limit,
        "claimer": runner,
        "lease_until": lease_until,
        "at": now,
    }


def _claim_order(row: Any) -> tuple[Any, ...]:
    return (row.priority, row.run_at, row.id)


async def _started(conn: AsyncConnection, rows: Sequence[Any], runner: str, now: datetime) -> None:
    """The claimed jobs' ``running`` events, in one statement."""
    events: Events = []
    for row in rows:
        await add_event(
            conn, row.id, JobStatus.RUNNING, row.attempts, now, worker=runner, into=events
        )
    await add_events(conn, events)


async def claim(
    conn: AsyncConnection,
    runner: str,
    now: datetime,
    lease_until: datetime,
    limit: int = 1,
) -> list[JobRow]:
    """Take up to ``limit`` due jobs (by priority, then due time) and start an attempt of each,
    in one statement, leased to ``runner``; the rows, in claim order."""
    rows = (await conn.execute(_CLAIM, _claim_values(runner, now, lease_until, limit))).all()
    await _started(conn, rows, runner, now)
    return sorted(rows, key=_claim_order)


async def get_inputs(conn: AsyncConnection, job_ids: Sequence[str]) -> dict[str, JobRow]:
    if len(job_ids) == 1:  # a busy worker's next job: the usual case
        rows = (await conn.execute(_INPUT, {"id": job_ids[0]})).all()
    else:
        rows = (await conn.execute(_INPUTS, {"ids": list(job_ids)})).all()
    return {row.job_id: row for row in rows}


async def renew_leases(
    conn: AsyncConnection,
    worker: str,
    attempts: Sequence[tuple[str, int]],
    lease_until: datetime,
) -> set[tuple[str, int]]:
    """Extend the leases of these ``(job id, attempt)``s, in one statement; those still held
    (the others were cancelled or taken over)."""
    if not attempts:
        return set()
    query = (
        update(jobs)
        .where(
            jobs.c.id.in_([job_id for job_id, _ in attempts]),
            text(IS_RUNNING),
            jobs.c.lease_owner == worker,
        )
        .values(lease_expires_at=lease_until)
        .returning(jobs.c.id, jobs.c.attempts)
    )
    renewed = {(row.id, row.attempts) for row in (await conn.execute(query)).all()}
    return renewed & set(attempts)


async def mark_started(
    conn: AsyncConnection, job_id: str, runner: str, attempt: int, now: datetime
) -> None:
    """A job fetched ahead started only now: its start time says when it began to run, not
    when it was claimed."""
    await conn.execute(_MARK_STARTED, {**_held_by(job_id, runner, attempt), "at": now})


async def save_progress(
    conn: AsyncConnection, job_id: str, worker: str, attempt: int, progress: float, now: datetime
) -> bool:
    values = {**_held_by(job_id, worker, attempt), "new_progress": progress, "at": now}
    return (await conn.execute(_SAVE_PROGRESS, values)).rowcount == 1


async def finish_succeeded(
    conn: AsyncConnection,
    job_id: str,
    worker: str,
    attempt: int,
    result: ResultData,
    now: datetime,
) -> bool:
    """Store the result and the status change together, once; False if the fence failed."""
    fence = {**_held_by(job_id, worker, attempt), "at": now}
    result_row = {
        "job_id": job_id,
        "attempt": attempt,
        "kind": result.kind,
        "data": result.data,
        "value": result.value,
        "rows": result.rows,
        "path": result.path,
        "created_at": now,
    }
    if conn.dialect.name == "postgresql":
        stored = await conn.execute(
            _SUCCEED_WITH_RESULT,
            fence | {f"result_{k}": v for k, v in result_row.items() if k != "job_id"},
        )
        if stored.rowcount != 1:
            return False
    else:
        if (await conn.execute(_SUCCEED, fence)).rowcount != 1:
            return False
        await insert_rows(conn, job_results, [result_row])
    await add_event(conn, job_id, JobStatus.SUCCEEDED, attempt, now, worker=worker)
    return True


async def finish_failed_attempt(
    conn: AsyncConnection,
    job_id: str,
    worker: str,
    attempt: int,
    error: AttemptError,
    now: datetime,
    retry_at: datetime | None,
) -> bool:
    """Record a failed attempt: ``retrying`` until ``retry_at``, or ``failed`` when None."""
    status = JobStatus.RETRYING if retry_at is not None else JobStatus.FAILED
    values: dict[str, Any] = {"status": status, "updated_at": now, **_error_columns(error)}
    values |= _NO_LEASE
    if retry_at is not None:
        values["run_at"] = retry_at
    else:
        values["finished_at"] = now
    changed = await conn.execute(
        update(jobs).where(_FENCE).values(values), _held_by(job_id, worker, attempt)
    )
    if changed.rowcount != 1:
        return False
    await add_event(conn, job_id, status, attempt, now, worker=worker, error=error)
    return True


async def record_decision(
    conn: AsyncConnection,
    job_id: str,
    worker: str,
    attempt: int,
    decision: Decision,
    outcome: Outcome,
    now: datetime,
) -> bool:
    """Write what an attempt's outcome made of its job (``lifecycle.decide``), fenced on the
    attempt's lease; False if the fence failed (cancelled or taken over meanwhile)."""
    if decision.verdict is Verdict.HAND_BACK:
        return await release(conn, job_id, worker, attempt, now)
    if decision.verdict is Verdict.SUCCEED:
        assert outcome.result is not None
        return await finish_succeeded(conn, job_id, worker, attempt, outcome.result, now)
    assert outcome.error is not None
    return await finish_failed_attempt(
        conn, job_id, worker, attempt, outcome.error, now, decision.retry_at
    )


async def release(
    conn: AsyncConnection, job_id: str, worker: str, attempt: int, now: datetime
) -> bool:
    """Hand a running job back to the queue without counting its attempt (graceful stop)."""
    changed = await conn.execute(
        update(jobs)
        .where(_FENCE)
        .values(
            status=JobStatus.QUEUED,
            attempts=jobs.c.attempts - 1,
            run_at=now,
            updated_at=now,
            progress=None,
            **_NO_LEASE,
        ),
        _held_by(job_id, worker, attempt),
    )
    if changed.rowcount != 1:
        return False
    await add_event(conn, job_id, JobStatus.QUEUED, attempt - 1, now, worker=worker)
    return True


async def running_lease_owners(conn: AsyncConnection) -> set[str]:
    query = select(jobs.c.lease_owner).where(text(IS_RUNNING)).distinct()
    return {owner for (owner,) in (await conn.execute(query)).all() if owner}


async def reclaim_lost(
    conn: AsyncConnection,
    now: datetime,
    dead_owners: Collection[str] = (),
    keep: Collection[str] = (),
) -> list[tuple[str, str]]:
    """Running jobs whose lease expired, or whose owner is known dead, lost their attempt;
    except the jobs in ``keep`` (the caller's own, still held).

    Each goes back to the queue while attempts remain, else ends ``failed`` with
    ``WorkerLost``. Returns ``(job_id, new status)`` for each.
    """
    lost = or_(jobs.c.lease_expires_at < now, jobs.c.lease_owner.in_(list(dead_owners)))
    query = (
        select(jobs.c.id, jobs.c.lease_owner, jobs.c.attempts, jobs.c.max_attempts)
        .where(text(IS_RUNNING), lost)
        .with_for_update(skip_locked=True)
    )
    changed: list[tuple[str, str]] = []
    for job_id, owner, attempts, max_attempts in (await conn.execute(query)).all():
        if job_id in keep:
            continue
        exhausted = attempts >= max_attempts
        error = lost_worker_error(attempts, max_attempts, owner)
        if exhausted:
            ok = await finish_failed_attempt(conn, job_id, owner, attempts, error, now, None)
            status = JobStatus.FAILED
        else:
            # run_at stays as it was (in the past): the job keeps its place in the queue.
            values = {
                "status": JobStatus.QUEUED,
                "updated_at": now,
                "progress": None,
                **_error_columns(error),
                **_NO_LEASE,
            }
            result = await conn.execute(
                update(jobs).where(_FENCE).values(values), _held_by(job_id, owner, attempts)
            )
            ok = result.rowcount == 1
            if ok:
                await add_event(conn, job_id, JobStatus.QUEUED, attempts, now, error=error)
            status = JobStatus.QUEUED
        if ok:
            changed.append((job_id, status))
    return changed


async def next_due_at(conn: AsyncConnection) -> datetime | None:
    """When the earliest waiting job becomes due (it may be now, or in the past)."""
    query = select(func.min(jobs.c.run_at)).where(text(IS_WAITING))
    value: datetime | None = (await conn.execute(query)).scalar()
    if value is not None and value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value


async def release_all(
    conn: AsyncConnection, worker: str, now: datetime, keep: Collection[str] = ()
) -> int:
    """Hand back every job ``worker`` still runs but those in ``keep``, uncounted (the end of
    a graceful stop)."""
    query = select(jobs.c.id, jobs.c.attempts).where(text(IS_RUNNING), jobs.c.lease_owner == worker)
    released = 0
    for job_id, attempts in (await conn.execute(query)).all():
        if job_id not in keep:
            released += await release(conn, job_id, worker, attempts, now)
    return released


def status_counts(owner: str | None = None) -> Select[Any]:
    """The number of jobs in each status (of ``owner``, or of everyone), from ``job_counts``:
    a sum over a few rows per status, however many jobs there are."""
    query = select(job_counts.c.status, func.sum(job_counts.c.n)).group_by(job_counts.c.status)
    if owner is not None:
        query = query.where(job_counts.c.owner == owner)
    return query


async def count_by_status(conn: AsyncConnection, owner: str | None = None) -> dict[str, int]:
    counts = {status.value: 0 for status in JobStatus}
    for status, count in (await conn.execute(status_counts(owner))).all():
        counts[status] = int(count)
    return counts


# An arbitrary constant naming the fold among the server's advisory locks (PostgreSQL).
_FOLD_LOCK_KEY = 0x6A6F6275
# PostgreSQL: the rows summed are the rows deleted, in one statement, so a change that
# commits meanwhile is neither lost nor counted twice (it stays, a row of its own).
_FOLD_POSTGRES = """
WITH gone AS (DELETE FROM job_counts RETURNING owner, status, n)
INSERT INTO job_counts (owner, status, n)
SELECT owner, status, SUM(n) FROM gone GROUP BY owner, status HAVING SUM(n) <> 0
"""


async def count_rows(conn: AsyncConnection) -> int:
    """How many rows ``job_counts`` holds (``fold_counts`` makes them few again)."""
    return int((await conn.execute(select(func.count()).select_from(job_counts))).scalar_one())


async def fold_counts(conn: AsyncConnection) -> int | None:
    """Replace the rows of ``job_counts`` by one per owner and status, with their sum; how
    many rows that left (None: another instance is folding them)."""
    if conn.dialect.name == "postgresql":
        # One fold at a time: a second would only wait for the first's rows, then find none.
        locked = select(func.pg_try_advisory_xact_lock(_FOLD_LOCK_KEY))
        if not (await conn.execute(locked)).scalar_one():
            return None
        return int((await conn.exec_driver_sql(_FOLD_POSTGRES)).rowcount)
    # SQLite: nothing else writes during this transaction. The sums are new rows, above
    # the highest id folded.
    last = (await conn.execute(select(func.max(job_counts.c.id)))).scalar()
    if last is None:
        return 0
    folded = job_counts.c.id <= last
    sums = (
        select(job_counts.c.owner, job_counts.c.status, func.sum(job_counts.c.n))
        .where(folded)
        .group_by(job_counts.c.owner, job_counts.c.status)
        .having(func.sum(job_counts.c.n) != 0)
    )
    left = await conn.execute(insert(job_counts).from_select(["owner", "status", "n"], sums))
    await conn.execute(delete(job_counts).where(folded))
    return int(left.rowcount)


def oldest_waiting() -> Select[Any]:
    """When the oldest queued job was created, read from ``ix_jobs_due`` (waiting jobs only)."""
    return select(func.min(jobs.c.created_at)).where(
        text(IS_WAITING), jobs.c.status == JobStatus.QUEUED
    )


async def oldest_waiting_created_at(conn: AsyncConnection) -> datetime | None:
    value: datetime | None = (await conn.execute(oldest_waiting())).scalar()
    if value is not None and value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value


def prunable(finished_before: datetime, limit: int) -> Select[tuple[str]]:
    """The ids of up to ``limit`` jobs finished before the cutoff, oldest first, read from
    ``ix_jobs_finished`` (its condition written out, for the planner to see it applies)."""
    return (
        select(jobs.c.id)
        .where(text(IS_FINISHED), jobs.c.finished_at < finished_before)
        .order_by(jobs.c.finished_at)
        .limit(limit)
    )


async def prune_finished(
    conn: AsyncConnection, finished_before: datetime, limit: int
) -> tuple[int, list[str]]:
    """Delete up to ``limit`` finished jobs older than the cutoff (inputs, results and events
    go with them by cascade); how many were deleted, and the input files they leave unused."""
    ids = (await conn.execute(prunable(finished_before, limit))).scalars().all()
    if not ids:
        return 0, []
    names = [
        name
        for table in (job_inputs, job_results)
        for name in (
            await conn.execute(
                select(table.c.path).where(table.c.job_id.in_(ids), table.c.path.is_not(None))
            )
        ).scalars()
    ]
    await conn.execute(delete(jobs).where(jobs.c.id.in_(ids)))
    return len(ids), names


async def unreferenced_files(conn: AsyncConnection, names: Sequence[str]) -> list[str]:
    """Those of ``names`` that no input or result row names."""
    if not names:
        return []
    referenced = {
        name
        for table in (job_inputs, job_results)
        for name in (await conn.execute(select(table.c.path).where(table.c.path.in_(names))))
        .scalars()
        .all()
    }
    return [name for name in names if name not in referenced]
