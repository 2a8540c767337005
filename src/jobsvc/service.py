"""The use cases: submit, read, list, cancel, retry, fetch a result.

The service owns the transactions and applies the job vocabulary (``lifecycle``: which
states may be cancelled or retried); the repository only runs statements. CPU work on user
data (parsing an upload, rendering a result) goes to the ``Converter``, never the event loop.
The service never reaches into the runner: it tells it of new work and of cancelled jobs
through ``RunnerSignals``, and that is all.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from jobsvc import formats
from jobsvc import repository as repo
from jobsvc.committer import GroupCommit
from jobsvc.converter import Converter
from jobsvc.db import Database
from jobsvc.errors import (
    Conflict,
    IdempotencyConflict,
    InvalidParams,
    NotAcceptable,
    NotFound,
    StorageUnavailable,
    UnknownTask,
    problems,
)
from jobsvc.files import FileStore
from jobsvc.lifecycle import CANCELLABLE, RETRYABLE, TERMINAL, JobStatus
from jobsvc.metrics import Metrics
from jobsvc.settings import Settings
from jobsvc.submission import InputData, NewJob
from jobsvc.tasks import registry
from jobsvc.tasks.registry import function_path, task_for


@dataclass(frozen=True)
class JobSpec:
    """What a submit asks for, before it is checked against the task."""

    task: str
    params: dict[str, Any]
    priority: int = 0
    max_attempts: int | None = None
    retry_delay: float | None = None
    run_at: datetime | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True)
class Prepared:
    """A job checked and encoded, its id known, not yet stored."""

    job: NewJob
    data: InputData

    @property
    def id(self) -> str:
        assert self.job.id is not None
        return self.job.id


@dataclass(frozen=True)
class Submitted:
    job: repo.JobRow
    created: bool  # False when an Idempotency-Key matched an earlier submit


def request_hash(spec: JobSpec, data_digest: str) -> str:
    """What an Idempotency-Key is bound to: the task, its options and the data."""
    canonical = json.dumps(
        {
            "task": spec.task,
            "params": spec.params,
            "priority": spec.priority,
            "max_attempts": spec.max_attempts,
            "retry_delay": spec.retry_delay,
            "run_at": spec.run_at.isoformat() if spec.run_at else None,
            "data": data_digest,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def files_unavailable(error: OSError) -> StorageUnavailable:
    """A files directory that refuses writes (full, read-only) answers like the database."""
    return StorageUnavailable(
        f"The files directory cannot take writes ({error.strerror or error}); nothing was "
        "changed. Try again later."
    )


class RunnerSignals(Protocol):
    """What the service tells this instance's runner (``runner.Runner`` has both)."""

    def notify(self) -> None:
        """There may be new work due now."""

    def abort(self, job_id: str) -> bool:
        """The job was cancelled: stop its attempt here, if one runs here."""
        ...


class NoRunner:
    """An instance without a runner (the API alone): other instances learn of new work by
    NOTIFY or by their poll, and stop a cancelled job at their next heartbeat."""

    def notify(self) -> None:
        return None

    def abort(self, job_id: str) -> bool:
        return False


class JobService:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        converter: Converter,
        runner: RunnerSignals | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.converter = converter
        self.runner: RunnerSignals = runner or NoRunner()
        self.metrics = metrics or Metrics()
        self.committer = GroupCommit(db)
        self.files = FileStore.for_settings(settings)
        self.limits = formats.Limits(
            max_rows=settings.max_rows,
            max_columns=settings.max_columns,
            max_cell_chars=settings.max_cell_chars,
        )

    async def convert(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        """``func(*args, **kwargs)`` off the event loop: CPU work on a request's data."""
        return await self.converter.run(func, *args, **kwargs)

    # --- submit ------------------------------------------------------------------------------

    def _new_job(self, spec: JobSpec, owner: str, digest: str, job_id: str | None = None) -> NewJob:
        task = registry.get(spec.task)
        if task is None:
            known = ", ".join(t.name for t in registry.all())
            raise UnknownTask(f"no task named {spec.task!r}; registered tasks: {known}")
        try:
            params = task.validate_params(spec.params)
        except ValidationError as error:
            raise InvalidParams(
                f"params do not fit task {spec.task!r}", detail=problems(error, "params")
            ) from None
        return NewJob(
            task=task.name,
            params=params,
            max_attempts=spec.max_attempts
            or task.max_attempts
            or self.settings.default_max_attempts,
            retry_delay_seconds=(
                spec.retry_delay
                if spec.retry_delay is not None
                else task.retry_delay
                if task.retry_delay is not None
                else self.settings.retry_base_seconds
            ),
            priority=spec.priority,
            timeout_seconds=task.timeout,
            run_at=spec.run_at,
            owner=owner,
            idempotency_key=spec.idempotency_key,
            request_hash=request_hash(spec, digest) if spec.idempotency_key else None,
            id=job_id,
        )

    async def submit_records(
        self, spec: JobSpec, records: formats.EncodedRecords, owner: str = ""
    ) -> Submitted:
        """Submit records already checked and encoded (``formats.encode_records``; for a large
        body, in a converter process)."""
        digest = hashlib.sha256(records.payload).hexdigest() if spec.idempotency_key else ""
        job = self._new_job(spec, owner, digest)
        data = InputData("json", records.payload, records.rows, records.columns)
        return await self._insert(job, data)

    def upload_path(self) -> Path | None:
        """Where a file upload streams to: into the files directory when inputs are kept as
        files (so that keeping it is a rename), else None (a temporary file)."""
        if self.files is None:
            return None
        try:
            self.files.prepare()
        except OSError as error:
            raise files_unavailable(error) from None
        return self.files.new_upload_path()

    def new_upload(self, spec: JobSpec, owner: str = "") -> NewJob:
        """The job an upload is for, its task and params checked before the body is read: a
        bad submit costs no upload and no parse."""
        return self._new_job(spec, owner, "", repo.new_job_id())

    async def submit_file(
        self, spec: JobSpec, job: NewJob, path: str, media_type: str
    ) -> Submitted:
        """Store ``job`` (from ``new_upload``) with the uploaded file at ``path`` as its input."""
        if self.files is not None:
            return await self._submit_kept_file(spec, job, Path(path), media_type)
        parsed: formats.ParsedUpload = await self.convert(
            formats.parse_upload,
            path,
            media_type,
            self.limits,
            digest=spec.idempotency_key is not None,
        )
        data = InputData(
            parsed.format, parsed.data, parsed.rows, parsed.columns, size_bytes=parsed.size_bytes
        )
        return await self._insert(self._bound_to_data(spec, job, parsed), data)

    async def _submit_kept_file(
        self, spec: JobSpec, job: NewJob, upload: Path, media_type: str
    ) -> Submitted:
        """Keep the upload itself (``upload`` is in the files directory) as the job's input."""
        files = self.files
        assert files is not None
        assert job.id is not None
        kept = files.upload_name_for(job.id, formats.stored_format(media_type))
        cache = files.cache_name_for(job.id)
        try:
            path = files.take(upload, kept)
        except OSError as error:
            raise files_unavailable(error) from None
        # Both before the commit, side by side: the parse that checks the upload, and the
        # disk's flush of it (for a 39 MB CSV, 0.08 s that the parse's 0.15 s now hides).
        checking = self._check_kept(job, path, media_type, cache, spec)
        flushing = asyncio.to_thread(files.make_durable, kept)
        outcomes = await asyncio.gather(checking, flushing, return_exceptions=True)
        failure = next((o for o in outcomes if isinstance(o, BaseException)), None)
        if failure is not None:
            await files.discard([kept])  # and its parsed copy, if the parse got that far
            if isinstance(failure, OSError):
                raise files_unavailable(failure) from None
            raise failure
        parsed = outcomes[0]
        assert isinstance(parsed, formats.ParsedUpload)
        data = InputData(
            parsed.format,
            None,
            parsed.rows,
            parsed.columns,
            path=kept,
            size_bytes=parsed.size_bytes,
        )
        # If the insert fails the files stay: a failed commit may still have committed (a
        # connection lost during COMMIT), and a file no row names is pruned after an hour.
        try:
            submitted = await self._insert(self._bound_to_data(spec, job, parsed), data)
        except BaseException:
            await self.converter.forget_upload(job.id)
            raise
        if not submitted.created:
            await self.converter.forget_upload(job.id)
            await files.discard([kept])  # an earlier submit's job is the answer: no one's files
        return submitted

    async def _check_kept(
        self, job: NewJob, path: Path, media_type: str, cache: str, spec: JobSpec
    ) -> formats.ParsedUpload:
        """Parse and check a kept upload: where its job will run if the converter can (a job
        due now only: a table kept for later would wait in memory), else in a converter
        process that leaves the parsed table as the copy ``cache`` for the worker."""
        assert self.files is not None
        assert job.id is not None
        digest = spec.idempotency_key is not None
        due_now = spec.run_at is None or spec.run_at <= self.db.now()
        if due_now and media_type in formats.TEXT_UPLOADS:
            checked = await self.converter.check_upload(
                job.id, str(path), media_type, self.limits, digest
            )
            if checked is not None:
                return checked
        parsed: formats.ParsedUpload = await self.convert(
            formats.parse_upload,
            str(path),
            media_type,
            self.limits,
            cache_at=str(self.files.path(cache)),
            durable_cache=self.files.cache_is_durable,
            digest=digest,
        )
        return parsed

    @staticmethod
    def _bound_to_data(spec: JobSpec, job: NewJob, parsed: formats.ParsedUpload) -> NewJob:
        if spec.idempotency_key is None:
            return job
        # The key is bound to the data too: the same key with another file is a conflict.
        return dataclasses.replace(job, request_hash=request_hash(spec, parsed.sha256))

    def prepare_call(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        owner: str = "",
    ) -> Prepared:
        """A job that calls ``func(*args, **kwargs)`` in a worker: a registered task (its data
        first, params by name) or any importable module-level function.

        Raises ``TypeError`` saying why when the function or an argument cannot be stored.
        """
        job_id = repo.new_job_id()
        task = task_for(func)
        if task is None:
            path = function_path(func)
            return Prepared(
                NewJob(
                    task=path,
                    params={},
                    max_attempts=self.settings.default_max_attempts,
                    retry_delay_seconds=self.settings.retry_base_seconds,
                    owner=owner,
                    id=job_id,
                ),
                InputData("call", formats.encode_call(args, kwargs), 0, 0),
            )
        if len(args) != 1:
            raise TypeError(
                f"task {task.name!r} takes its data as the one positional argument "
                "(a DataFrame or a list of records); pass its params by name"
            )
        job = self._new_job(JobSpec(task=task.name, params=kwargs), owner, "", job_id)
        data = args[0]
        if isinstance(data, list):
            records = formats.to_storable(data, "argument 1")
            body = json.dumps(records, separators=(",", ":")).encode()
            return Prepared(job, InputData("json", body, len(data), 0))
        frame = formats.as_frame(data)
        return Prepared(
            job, InputData("parquet", formats.frame_to_parquet(frame), len(frame), frame.shape[1])
        )

    async def submit_prepared(self, prepared: Sequence[Prepared]) -> list[repo.JobRow]:
        """Store prepared jobs in one transaction: all of them, or none."""
        now = self.db.now()
        async with self.db.write() as conn:
            rows = [await repo.insert_job(conn, p.job, p.data, now) for p in prepared]
            await repo.announce_due_jobs(conn)
        self.runner.notify()
        return rows

    async def enqueue_in(
        self,
        session: AsyncSession | AsyncConnection,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> str:
        """Insert a call job through the caller's own transaction (see JobQueue.enqueue_in)."""
        prepared = self.prepare_call(func, args, kwargs)
        conn = await session.connection() if isinstance(session, AsyncSession) else session
        await repo.insert_jobs(conn, [(prepared.job, prepared.data)], self.db.now())
        await repo.announce_due_jobs(conn)  # PostgreSQL delivers it only if they commit
        if isinstance(session, AsyncSession):
            runner = self.runner
            # Wake our workers when (and only if) the caller commits.
            event.listen(
                session.sync_session, "after_commit", lambda _s: runner.notify(), once=True
            )
        return prepared.id

    async def _insert(self, job: NewJob, data: InputData) -> Submitted:
        if job.idempotency_key is None:
            row = await self.committer.insert(job, data)
            self.metrics.submitted.inc()
            return Submitted(row, created=True)
        try:
            async with self.db.write() as conn:
                if job.idempotency_key is not None:
                    earlier = await repo.find_by_idempotency_key(
                        conn, job.owner, job.idempotency_key
                    )
                    if earlier is not None:
                        return self._replay(earlier, job)
                row = await repo.insert_job(conn, job, data, self.db.now())
                await repo.announce_due_jobs(conn)
        except IntegrityError:
            # Two submits with one key raced (possible on PostgreSQL): the loser replays.
            if job.idempotency_key is None:
                raise
            async with self.db.read() as conn:
                earlier = await repo.find_by_idempotency_key(conn, job.owner, job.idempotency_key)
            if earlier is None:
                raise
            return self._replay(earlier, job)
        self.metrics.submitted.inc()
        return Submitted(row, created=True)

    @staticmethod
    def _replay(earlier: repo.JobRow, job: NewJob) -> Submitted:
        if earlier.request_hash != job.request_hash:
            raise IdempotencyConflict(
                f"Idempotency-Key {job.idempotency_key!r} was used for a different request "
                f"(job {earlier.id})"
            )
        return Submitted(earlier, created=False)

    # --- read --------------------------------------------------------------------------------

    async def get(self, job_id: str, owner: str | None = None) -> repo.JobRow:
        async with self.db.read() as conn:
            row = await repo.get_job(conn, job_id, owner)
        if row is None:
            raise NotFound(f"no job {job_id!r}")
        return row

    async def list(
        self,
        *,
        owner: str | None = None,
        statuses: Sequence[str] = (),
        task: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[Sequence[repo.JobRow], str | None]:
        """A page of jobs, newest first, and the cursor of the next page (None at the end)."""
        async with self.db.read() as conn:
            rows = await repo.list_jobs(
                conn, owner=owner, statuses=statuses, task=task, limit=limit + 1, before_id=cursor
            )
        if len(rows) > limit:
            return rows[:limit], rows[limit - 1].id
        return rows, None

    async def events(self, job_id: str, owner: str | None = None) -> Sequence[repo.JobRow]:
        async with self.db.read() as conn:
            if await repo.get_job(conn, job_id, owner) is None:
                raise NotFound(f"no job {job_id!r}")
            return await repo.list_events(conn, job_id)

    async def result(self, job_id: str, owner: str | None = None) -> repo.JobRow:
        """The stored result of a succeeded job; ``Conflict`` while it has none."""
        job = await self.get(job_id, owner)
        if job.status != JobStatus.SUCCEEDED:
            raise Conflict(f"job {job_id} is {job.status}; a result exists once it has succeeded")
        async with self.db.read() as conn:
            stored = await repo.get_result(conn, job_id)
        if stored is None:  # only if someone deleted the row by hand
            raise NotFound(f"the result of job {job_id} is missing")
        return stored

    async def render_result(self, stored: repo.JobRow, media_type: str) -> bytes:
        if stored.kind == "json":
            if media_type != formats.JSON_MEDIA:
                raise NotAcceptable("this job's result is a JSON object; only application/json")
            return json.dumps(stored.value).encode()
        if stored.kind == "none":
            if media_type != formats.JSON_MEDIA:
                raise NotAcceptable("this job has no result data; only application/json")
            return b"null"
        source: bytes | str = stored.data
        if stored.path:
            if self.files is None:
                raise NotFound(
                    f"the result file {stored.path!r} is not where JOBSVC_FILES_DIR says"
                )
            source = str(self.files.path(stored.path))
        if media_type == formats.PARQUET and isinstance(source, bytes):
            return source  # stored as Parquet already
        render = {
            formats.CSV: formats.render_csv,
            formats.PARQUET: formats.render_parquet,
        }.get(media_type, formats.render_json)
        rendered: bytes = await self.convert(render, source)
        return rendered

    # --- change ------------------------------------------------------------------------------

    async def cancel(self, job_id: str, owner: str | None = None) -> repo.JobRow:
        now = self.db.now()
        row = await self._move(
            job_id,
            owner,
            "cancelled",
            CANCELLABLE,
            JobStatus.CANCELLED,
            {"finished_at": now, "lease_owner": None, "lease_expires_at": None},
            now,
        )
        # A running attempt here stops now; one on another instance stops at its next
        # heartbeat, and its late writes are fenced off either way.
        self.runner.abort(job_id)
        return row

    async def retry(self, job_id: str, owner: str | None = None) -> repo.JobRow:
        now = self.db.now()
        reset = {
            "attempts": 0,
            "run_at": now,
            "started_at": None,
            "finished_at": None,
            "progress": None,
            "error_type": None,
            "error_message": None,
            "error_traceback": None,
        }
        row = await self._move(job_id, owner, "retried", RETRYABLE, JobStatus.QUEUED, reset, now)
        self.runner.notify()
        return row

    async def _move(
        self,
        job_id: str,
        owner: str | None,
        verb: str,
        allowed: frozenset[str],
        status: JobStatus,
        values: dict[str, Any],
        now: datetime,
    ) -> repo.JobRow:
        """A user's transition (``lifecycle``): made, or refused with why."""
        async with self.db.write() as conn:
            row = await repo.transition(
                conn,
                job_id,
                owner=owner,
                allowed_from=allowed,
                status=status,
                now=now,
                values=values,
            )
            if row is None:
                await self._explain_refusal(conn, job_id, owner, verb, allowed)
            if status is JobStatus.QUEUED:
                await repo.announce_due_jobs(conn)
        assert row is not None
        return row

    @staticmethod
    async def _explain_refusal(
        conn: Any, job_id: str, owner: str | None, verb: str, allowed: frozenset[str]
    ) -> None:
        current = await repo.get_job(conn, job_id, owner)
        if current is None:
            raise NotFound(f"no job {job_id!r}")
        states = ", ".join(sorted(allowed))
        terminal = " (it has finished)" if current.status in TERMINAL else ""
        raise Conflict(
            f"job {job_id} is {current.status}{terminal}; only {states} jobs can be {verb}"
        )

    async def counts(self, owner: str | None = None) -> dict[str, int]:
        """How many jobs are in each state."""
        async with self.db.read() as conn:
            return await repo.count_by_status(conn, owner)

    async def metrics_text(self) -> bytes:
        """The Prometheus exposition, with the table's current figures."""
        async with self.db.read() as conn:
            counts = await repo.count_by_status(conn)
            oldest = await repo.oldest_waiting_created_at(conn)
        return self.metrics.render(counts, oldest, self.db.now())

    async def health(self) -> None:
        await self.db.check()
