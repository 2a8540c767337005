"""The runner's writes that arrive together share one transaction.

An attempt's outcome, the claim of the job that takes its slot next, lease renewals and
progress are each a small write; on SQLite at ``synchronous=FULL`` each commit waits for the
disk. When an attempt ends, its outcome and the claim for the slot it frees are submitted in
the same moment, so they commit together: a busy queue costs one commit per job, not two.
Nothing waits on a timer: a write submitted while no transaction runs starts one at once.

If a shared transaction fails for a reason other than the database being unavailable, each
of its writes is tried alone once more, so that one write's fault stays its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection

from jobsvc.db import Database
from jobsvc.errors import StorageUnavailable

T = TypeVar("T")
Write = Callable[[AsyncConnection], Awaitable[Any]]


class WriteBatch:
    def __init__(self, db: Database, max_batch: int = 64) -> None:
        self.db = db
        self.max_batch = max_batch
        self._pending: list[tuple[Write, asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None

    def submit(self, write: Callable[[AsyncConnection], Awaitable[T]]) -> asyncio.Future[T]:
        """Queue ``write`` (run inside a transaction); the future is its value once committed,
        or the error that rolled it back."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((write, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="jobsvc-runner-writes")
        return future

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            batch = [(write, future) for write, future in batch if not future.cancelled()]
            if not batch:
                continue
            try:
                values = await self._run(batch)
            except StorageUnavailable as error:
                _fail(batch, error)
                continue
            except Exception as error:
                if len(batch) == 1:
                    _fail(batch, error)
                    continue
                for one in batch:  # each alone: the fault is its own
                    try:
                        _succeed([one], await self._run([one]))
                    except Exception as alone:
                        _fail([one], alone)
                continue
            _succeed(batch, values)

    async def _run(self, batch: list[tuple[Write, asyncio.Future[Any]]]) -> list[Any]:
        async with self.db.write() as conn:
            return [await write(conn) for write, _ in batch]

    async def close(self) -> None:
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)


def _fail(batch: list[tuple[Write, asyncio.Future[Any]]], error: BaseException) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(error)


def _succeed(batch: list[tuple[Write, asyncio.Future[Any]]], values: list[Any]) -> None:
    for (_, future), value in zip(batch, values, strict=True):
        if not future.done():
            future.set_result(value)
