"""The producer of one queue: claims due jobs into that queue's free slots.

A queue has ``slots`` (how many of its jobs this runner runs at once). The producer claims as
many due jobs as it has room for, in one statement, and starts each one a slot takes. It
claims when woken (a submit here, a NOTIFY from another instance, a retry coming due), when a
slot frees, and every ``poll_seconds`` (how it sees what it was not told about). The claim for
a freed slot is submitted in the same moment as the outcome that freed it, so that both share
one transaction (``writes``). After a claim, the loop waits for news or the poll; it never
claims again at once.

The prefetch policy: while this queue's jobs are short (the last one ran under
``JOBSVC_PREFETCH_BELOW_SECONDS``, 1 s by default; 0 turns it off), the producer claims one job
more per slot and keeps it ready, so that when a job ends the next one starts at once instead
of waiting for the transaction that records the outcome and claims again. A ready job is leased
(``running``) while it waits; its ``started_at`` is set again when it really starts, in that
same transaction. A more urgent job submitted meanwhile waits for at most one ready job per
slot; a cancelled ready job is dropped when its turn comes, and at a stop the ready jobs go
back to the queue uncounted. After a long job nothing is fetched ahead, so that no job waits
behind one while another instance could run it. Measured with ``make bench``: small jobs and
the PostgreSQL drain (see docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from jobsvc import repository as repo
from jobsvc.errors import StorageUnavailable
from jobsvc.loops import BackgroundLoop
from jobsvc.runner.attempt import Attempt
from jobsvc.runner.context import RunnerContext

log = logging.getLogger("jobsvc.runner")


class Producer:
    def __init__(
        self,
        queue: str,
        slots: int,
        context: RunnerContext,
        *,
        claimed: Callable[[Attempt], None],
        start: Callable[[Attempt], None],
        drop: Callable[[Attempt], None],
        hand_back: Callable[[Attempt], None],
    ) -> None:
        """``claimed``: an attempt is leased now; ``start``: run it in a slot; ``drop``: it was
        cancelled before its turn; ``hand_back``: the runner stops before its turn."""
        self.queue = queue
        self.slots = slots
        self.db = context.db
        self.writes = context.writes
        self.runner_id = context.runner_id
        self.lease_seconds = context.settings.lease_seconds
        self.poll_seconds = context.settings.poll_seconds
        self.prefetch_below_seconds = context.settings.prefetch_below_seconds
        self._claimed = claimed
        self._start = start
        self._drop = drop
        self._hand_back = hand_back
        self.running = 0  # attempts started in a slot
        self.ready: deque[Attempt] = deque()  # claimed ahead, waiting for a slot
        self.prefetch = 0  # how many jobs to keep ready: 0, or one per slot while jobs are short
        self._reserved = 0  # room taken by a claim under way
        self._claiming: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._loop = BackgroundLoop(f"jobsvc-producer-{queue}", self._claim_forever)
        self.stopping = False

    @property
    def free(self) -> int:
        """How many more jobs to claim now."""
        room = self.slots + self.prefetch
        return room - self.running - len(self.ready) - self._reserved

    def notify(self) -> None:
        """There may be new work: look now instead of at the next poll."""
        self._wake.set()

    def slot_freed(self, seconds: float) -> None:
        """An attempt of this queue ended after ``seconds``: start the next ready job at once,
        and claim for the room that leaves."""
        self.running -= 1
        self.prefetch = self.slots if seconds < self.prefetch_below_seconds else 0
        self._start_ready()
        self.claim()

    def claim(self) -> None:
        """Claim jobs for the free room, unless a claim is under way or the runner stops."""
        if self.stopping or self.free <= 0 or self._claiming is not None:
            return
        wanted = self.free
        self._reserved = wanted
        now = self.db.now()
        lease_until = now + timedelta(seconds=self.lease_seconds)

        async def write(conn: AsyncConnection) -> list[tuple[Any, Any]]:
            return await repo.claim_with_inputs(conn, self.runner_id, now, lease_until, wanted)

        claimed = self.writes.submit(write)
        self._claiming = asyncio.create_task(self._take(claimed), name="jobsvc-claim")

    async def _take(self, claimed: asyncio.Future[list[tuple[Any, Any]]]) -> None:
        try:
            rows = await claimed
        except StorageUnavailable as error:
            log.warning("cannot claim jobs now: %s", error)
            rows = []
        except Exception:
            log.exception("claiming jobs failed; trying again at the next poll")
            rows = []
        finally:
            self._claiming = None
            self._reserved = 0
        for job, stored in rows:
            attempt = Attempt(job, stored, self.queue)
            self._claimed(attempt)
            self.ready.append(attempt)
        self._start_ready()
        for waiting in self.ready:  # fetched ahead: its start time is set when it starts
            waiting.fetched_ahead = True

    def _start_ready(self) -> None:
        while self.ready and (self.stopping or self.running < self.slots):
            attempt = self.ready.popleft()
            if self.stopping:  # claimed as the runner stopped: back to the queue, uncounted
                attempt.interrupted = True
                self._hand_back(attempt)
            elif attempt.aborted:  # cancelled while it waited
                self._drop(attempt)
            else:
                self.running += 1
                self._start(attempt)

    async def start(self) -> None:
        self._loop.start()

    async def _claim_forever(self) -> None:
        while not self.stopping:
            self.claim()
            if self._claiming is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._claiming)
            # Until news (a submit, a NOTIFY, a retry due) or the poll; a freed slot claims
            # by itself (``slot_freed``).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_seconds):
                    await self._wake.wait()
            self._wake.clear()

    async def stop(self) -> None:
        """Claim no more; what a claim under way gets, and the ready jobs, are handed back."""
        self.stopping = True
        await self._loop.stop()
        if self._claiming is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._claiming)
        self._start_ready()
