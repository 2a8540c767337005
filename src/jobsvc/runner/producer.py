"""The producer of one queue: claims due jobs into that queue's free slots.

A queue has ``slots`` (how many of its jobs this runner runs at once). The producer claims as
many due jobs as it has free slots, in one statement, and hands each to ``start``. It claims
when woken (a submit here, a NOTIFY from another instance, a retry coming due), when a slot
frees, and every ``poll_seconds`` (how it sees what it was not told about). The claim for a
freed slot is submitted in the same moment as the outcome that freed it, so that both share
one transaction (``writes``). After a claim, the loop waits for news or the poll; it never
claims again at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
        start: Callable[[Attempt], None],
        hand_back: Callable[[Attempt], None],
    ) -> None:
        self.queue = queue
        self.slots = slots
        self.db = context.db
        self.writes = context.writes
        self.runner_id = context.runner_id
        self.lease_seconds = context.settings.lease_seconds
        self.poll_seconds = context.settings.poll_seconds
        self._start = start
        self._hand_back = hand_back
        self.active = 0  # slots taken: by running attempts, and by a claim under way
        self._claiming: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._loop = BackgroundLoop(f"jobsvc-producer-{queue}", self._claim_forever)
        self.stopping = False

    @property
    def free(self) -> int:
        return self.slots - self.active

    def notify(self) -> None:
        """There may be new work: look now instead of at the next poll."""
        self._wake.set()

    def slot_freed(self) -> None:
        """An attempt of this queue ended: claim the slot's next job now."""
        self.active -= 1
        self.claim()

    def claim(self) -> None:
        """Claim jobs for the free slots, unless a claim is under way or the runner stops."""
        if self.stopping or self.free <= 0 or self._claiming is not None:
            return
        wanted = self.free
        self.active += wanted  # reserved until the claim says how many it found
        now = self.db.now()
        lease_until = now + timedelta(seconds=self.lease_seconds)

        async def write(conn: AsyncConnection) -> list[tuple[Any, Any]]:
            return await repo.claim_with_inputs(conn, self.runner_id, now, lease_until, wanted)

        claimed = self.writes.submit(write)
        self._claiming = asyncio.create_task(self._take(claimed, wanted), name="jobsvc-claim")

    async def _take(self, claimed: asyncio.Future[list[tuple[Any, Any]]], wanted: int) -> None:
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
        self.active -= wanted - len(rows)
        for job, stored in rows:
            attempt = Attempt(job, stored, self.queue)
            if self.stopping:  # claimed as the runner stopped: back to the queue, uncounted
                attempt.interrupted = True
                self._hand_back(attempt)
            else:
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
        """Claim no more; a claim under way hands back what it gets."""
        self.stopping = True
        await self._loop.stop()
        if self._claiming is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._claiming)
