"""The completer: decides what a job becomes after an attempt (``lifecycle.decide``) and
writes it, fenced on the attempt's lease, until the write holds.

An outcome is never thrown away. While the database cannot take it (SQLite locked by another
process, a full disk, PostgreSQL restarting) the completer keeps it and tries again, backing
off; the attempt stays held meanwhile, so the heartbeat keeps its lease and no rescuer takes
the job. The task is therefore never run again because a write failed. A write that fails for
another reason (a bug, a row the database refuses) is tried a few times, then given up: the
lease runs out and a rescuer retries the job, as after a crash.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncConnection

from jobsvc import repository as repo
from jobsvc import retry
from jobsvc.errors import StorageUnavailable
from jobsvc.files import FileStore
from jobsvc.lifecycle import Decision, Outcome, Verdict, decide
from jobsvc.runner.attempt import Attempt
from jobsvc.runner.context import RunnerContext
from jobsvc.runner.faults import FaultHooks
from jobsvc.runner.leases import Leases

log = logging.getLogger("jobsvc.runner")
_FIRST_PAUSE = 0.05
_LONGEST_PAUSE = 2.0
_TRIES_FOR_OTHER_ERRORS = 3


class Completer:
    def __init__(
        self,
        context: RunnerContext,
        leases: Leases,
        files: FileStore | None,
        faults: FaultHooks,
        on_retry_due: Callable[[float], None],
    ) -> None:
        self.settings = context.settings
        self.db = context.db
        self.writes = context.writes
        self.runner_id = context.runner_id
        self.leases = leases
        self.files = files
        self.faults = faults
        self._on_retry_due = on_retry_due
        self._pending: set[asyncio.Task[None]] = set()

    def decision_for(self, attempt: Attempt, outcome: Outcome, now: datetime) -> Decision:
        job = attempt.job
        backoff = retry.backoff_seconds(
            job.retry_delay_seconds, job.attempts, self.settings.retry_max_seconds
        )
        return decide(
            outcome, attempt=job.attempts, max_attempts=job.max_attempts, backoff=backoff, now=now
        )

    def complete(self, attempt: Attempt, outcome: Outcome) -> asyncio.Task[None]:
        """Write ``outcome``; its first try is queued now, so it shares a transaction with
        writes submitted in the same moment (the claim of the slot it frees)."""
        now = self.db.now()
        decision = self.decision_for(attempt, outcome, now)
        first = self._submit(attempt, outcome, decision, now)
        task = asyncio.create_task(self._until_written(attempt, outcome, decision, now, first))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    def _submit(
        self, attempt: Attempt, outcome: Outcome, decision: Decision, now: datetime
    ) -> asyncio.Future[bool]:
        try:
            self.faults.fire(self.faults.before_record, attempt.job_id)
        except Exception as error:
            failed: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            failed.set_exception(error)
            return failed

        async def write(conn: AsyncConnection) -> bool:
            return await repo.record_decision(
                conn, attempt.job_id, self.runner_id, attempt.number, decision, outcome, now
            )

        return self.writes.submit(write)

    async def _until_written(
        self,
        attempt: Attempt,
        outcome: Outcome,
        decision: Decision,
        now: datetime,
        written: asyncio.Future[bool],
    ) -> None:
        pause = _FIRST_PAUSE
        other_errors = 0
        while True:
            try:
                stored = await written
                break
            except StorageUnavailable as error:
                log.warning(
                    "job %s attempt %d: cannot record its outcome yet (%s); trying again in "
                    "%.2f s, its lease kept",
                    attempt.job_id,
                    attempt.number,
                    error,
                    pause,
                )
            except Exception:
                other_errors += 1
                log.exception(
                    "job %s attempt %d: recording its outcome failed",
                    attempt.job_id,
                    attempt.number,
                )
                if other_errors >= _TRIES_FOR_OTHER_ERRORS:
                    # Given up: the lease runs out and a rescuer retries the job.
                    self.leases.release(attempt)
                    return
            await asyncio.sleep(pause)
            pause = min(pause * 2, _LONGEST_PAUSE)
            written = self._submit(attempt, outcome, decision, now)
        self.leases.release(attempt)
        if not stored:  # fenced out: cancelled or taken over meanwhile
            await discard_result_file(self.files, outcome)
        elif decision.verdict is Verdict.RETRY and decision.retry_at is not None:
            self._on_retry_due((decision.retry_at - now).total_seconds())

    async def drain(self, timeout: float) -> int:  # noqa: ASYNC109 - a bound on a stop
        """Wait up to ``timeout`` for every outcome to be written; how many are left."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=timeout)
        return len(self._pending)


async def discard_result_file(files: FileStore | None, outcome: Outcome) -> None:
    """Remove the file of a result that will not be stored."""
    if outcome.result is not None and outcome.result.path and files is not None:
        await files.discard([outcome.result.path])
