"""The attempts this runner holds, and the heartbeat that renews their leases.

An attempt is held from its claim until its outcome is written (or it is handed back): while
it runs, and while a written outcome waits for a database that cannot take it. Every third of
``JOBSVC_LEASE_SECONDS`` one statement renews all of their leases. A renewal that fails (the
database locked or away) is tried again soon, backing off, rather than a third later. An
attempt whose lease another instance took over, or whose job was cancelled, is aborted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncConnection

from jobsvc import repository as repo
from jobsvc.loops import BackgroundLoop
from jobsvc.runner.attempt import Attempt
from jobsvc.runner.context import RunnerContext

log = logging.getLogger("jobsvc.runner")


class Leases:
    def __init__(self, context: RunnerContext, on_lost: Callable[[Attempt], None]) -> None:
        self.db = context.db
        self.writes = context.writes
        self.runner_id = context.runner_id
        self.lease_seconds = context.settings.lease_seconds
        self._on_lost = on_lost
        self._held: dict[str, Attempt] = {}
        self._loop = BackgroundLoop("jobsvc-heartbeat", self._renew_forever)

    def hold(self, attempt: Attempt) -> None:
        self._held[attempt.job_id] = attempt

    def release(self, attempt: Attempt) -> None:
        # A retried job may already run again as a newer attempt: remove only our own.
        if self._held.get(attempt.job_id) is attempt:
            del self._held[attempt.job_id]

    def get(self, job_id: str) -> Attempt | None:
        return self._held.get(job_id)

    def held(self) -> list[Attempt]:
        return list(self._held.values())

    def held_ids(self) -> set[str]:
        return set(self._held)

    async def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def renew(self) -> None:
        """Renew every held lease now; abort the attempts that no longer hold theirs."""
        attempts = self.held()
        if not attempts:
            return
        until = self.db.now() + timedelta(seconds=self.lease_seconds)
        pairs = [(a.job_id, a.number) for a in attempts]

        async def write(conn: AsyncConnection) -> set[tuple[str, int]]:
            return await repo.renew_leases(conn, self.runner_id, pairs, until)

        kept = await self.writes.submit(write)
        for attempt in attempts:
            if (attempt.job_id, attempt.number) not in kept and self.get(attempt.job_id):
                log.info("job %s is no longer ours (cancelled or taken over)", attempt.job_id)
                self._on_lost(attempt)

    async def _renew_forever(self) -> None:
        interval = self.lease_seconds / 3
        delay = interval
        while True:
            await asyncio.sleep(delay)
            try:
                await self.renew()
            except Exception as error:
                # Sooner than the next third: the lease must outlast the database's bad moment.
                delay = 0.2 if delay >= interval else min(delay * 2, interval / 2)
                log.warning("renewing leases failed (%s); trying again in %.2f s", error, delay)
                continue
            delay = interval
