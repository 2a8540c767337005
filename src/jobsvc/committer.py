"""Group commit: submits that arrive together are stored in one transaction.

Each commit of a durable database waits for the disk (an fsync at SQLite's synchronous=FULL).
While one batch commits, the submits that arrive queue up; the next transaction takes all of
them at once. A lone submit is committed immediately, so nothing waits on a timer, and each
caller still gets its answer only after its own row is committed.

On SQLite a batch gives up (503) within the busy timeout of its oldest submit's arrival: the
submits that queued while an earlier batch waited for a locked database do not wait a whole
busy timeout more.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from jobsvc import repository as repo
from jobsvc.db import Database
from jobsvc.submission import InputData, NewJob

Pending = tuple[NewJob, InputData | None, "asyncio.Future[Any]", float]


class GroupCommit:
    def __init__(self, db: Database, max_batch: int = 256) -> None:
        self.db = db
        self.max_batch = max_batch
        self._pending: list[Pending] = []
        self._flusher: asyncio.Task[None] | None = None

    async def insert(self, job: NewJob, data: InputData | None) -> repo.JobRow:
        """Store one job; returns its row once the transaction holding it has committed."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((job, data, future, time.monotonic()))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="jobsvc-group-commit")
        row: repo.JobRow = await future
        return row

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            try:
                async with self.db.write(requested_at=batch[0][3]) as conn:
                    rows = await repo.insert_jobs(
                        conn, [(job, data) for job, data, _, _ in batch], self.db.now()
                    )
                    await repo.announce_due_jobs(conn)
            except Exception as error:  # the whole batch rolled back: every caller hears why
                for _, _, future, _ in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, _, future, _), row in zip(batch, rows, strict=True):
                if not future.done():
                    future.set_result(row)

    async def close(self) -> None:
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
