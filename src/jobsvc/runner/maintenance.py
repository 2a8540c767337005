"""Maintenance: the runner's timed services, each started and stopped on its own.

- ``Rescuer``: puts back the jobs of workers that are gone: a lease that ran out, or (on this
  host) an owner whose process has exited. Never the attempts this runner still holds: their
  outcome may be waiting for the database, and their heartbeat renews them.
- ``Pruner``: deletes finished jobs after ``JOBSVC_RETENTION_DAYS`` (``retention``).
- ``CountFolder``: folds ``job_counts`` back to a row per owner and status, so that counting
  stays a sum of a few rows.
- ``ClockSync``: measures this machine's clock against the database server's (PostgreSQL),
  since leases are compared across machines.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from datetime import timedelta

from jobsvc import repository as repo
from jobsvc import retention
from jobsvc.db import Database
from jobsvc.errors import StorageUnavailable
from jobsvc.files import FileStore
from jobsvc.loops import BackgroundLoop
from jobsvc.metrics import Metrics

log = logging.getLogger("jobsvc.runner")

LIVE_RUNNERS: set[str] = set()
"""The worker ids of the runners alive in this process: a rescuer tells a previous
incarnation (dead) from a sibling (another app in the same process) when both carry this
process's pid."""


class Periodic:
    """A service that does ``run_once`` every ``interval`` seconds until stopped; a failure
    is logged and tried again at the next interval."""

    name = "maintenance"

    def __init__(self, interval: float, first_delay: float | None = None) -> None:
        self.interval = interval
        self.first_delay = interval if first_delay is None else first_delay
        self._loop = BackgroundLoop(f"jobsvc-{self.name}", self._run_forever)

    async def run_once(self) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def _run_forever(self) -> None:
        delay = self.first_delay
        while True:
            await asyncio.sleep(delay)
            delay = self.interval
            try:
                await self.run_once()
            except StorageUnavailable as error:
                log.warning("%s skipped: %s", self.name, error)
            except Exception:
                log.exception("%s failed; trying again in %.1f s", self.name, self.interval)


class Rescuer(Periodic):
    name = "rescuer"

    def __init__(
        self,
        db: Database,
        host: str,
        interval: float,
        held_ids: Callable[[], set[str]],
        on_rescued: Callable[[], None],
        metrics: Metrics,
    ) -> None:
        super().__init__(interval)
        self.db = db
        self.host = host
        self._held_ids = held_ids
        self._on_rescued = on_rescued
        self.metrics = metrics

    def owner_is_dead(self, owner: str) -> bool:
        host, _, rest = owner.partition(":")
        pid_text = rest.partition(":")[0]
        if host != self.host or not pid_text.isdigit():
            return False  # another machine's: only its lease expiry can tell
        pid = int(pid_text)
        if pid == os.getpid():
            return owner not in LIVE_RUNNERS
        return not pid_alive(pid)

    async def run_once(self) -> list[tuple[str, str]]:  # type: ignore[override]
        async with self.db.write() as conn:
            owners = await repo.running_lease_owners(conn)
            dead = [owner for owner in owners if self.owner_is_dead(owner)]
            changed = await repo.reclaim_lost(conn, self.db.now(), dead, self._held_ids())
            if changed:
                await repo.announce_due_jobs(conn)
        for job_id, status in changed:
            log.warning("job %s lost its worker; now %s", job_id, status)
            self.metrics.rescues.inc()
        if changed:
            self._on_rescued()
        return changed


class Pruner(Periodic):
    name = "pruner"

    def __init__(
        self, db: Database, files: FileStore | None, retention_days: float, first_delay: float
    ) -> None:
        super().__init__(retention.PRUNE_EVERY_SECONDS, first_delay)
        self.db = db
        self.files = files
        self.age = timedelta(days=retention_days)

    async def run_once(self) -> None:
        if pruned := await retention.prune(self.db, self.age, self.files):
            log.info(
                "pruned %d jobs finished more than %s ago", pruned, retention.describe_age(self.age)
            )


class CountFolder(Periodic):
    name = "count folder"
    # A fold is a write (an fsync on SQLite): worth it once the rows it would save make a
    # count slower than a fold costs. Summing this many rows takes well under a millisecond.
    FOLD_ABOVE = 1000

    def __init__(self, db: Database, interval: float = 1.0) -> None:
        super().__init__(interval)
        self.db = db
        self._folded_rows = 0  # what the last fold left: a row per owner and status

    async def run_once(self) -> None:
        async with self.db.read() as conn:
            rows = await repo.count_rows(conn)
        if rows > self._folded_rows + self.FOLD_ABOVE:
            async with self.db.write() as conn:
                left = await repo.fold_counts(conn)
            if left is not None:
                self._folded_rows = left


class ClockSync(Periodic):
    name = "clock sync"

    def __init__(self, db: Database, interval: float) -> None:
        super().__init__(interval)
        self.db = db

    async def run_once(self) -> None:
        await self.db.sync_clock()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited; only its parent has not collected it yet
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
