"""``Runner``: the facade the app and ``jobsvc worker`` use; it wires the parts together.

    producer ──claims──▶ Attempt ──pool.take──▶ executor ──Outcome──▶ completer
       ▲                                                                   │
       └──────────── slot freed (its claim rides with the outcome) ◀───────┘
    leases (heartbeat) renew every held attempt; maintenance rescues, prunes, folds the counts,
    syncs the clock

A stop (``stop``): the producers claim no more; running attempts get the grace to finish and
are recorded as usual; the rest are interrupted (their processes killed) and handed back
without counting the attempt or recording an error; outcomes still waiting for the database
get up to a lease's length more. ``kill_now`` (a second signal) kills the processes at once
and writes nothing: what was running is recovered as after a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time

from sqlalchemy.ext.asyncio import AsyncConnection

from jobsvc import logs
from jobsvc import repository as repo
from jobsvc.converter import Converter
from jobsvc.db import Database
from jobsvc.errors import StorageUnavailable
from jobsvc.files import FileStore
from jobsvc.lifecycle import Outcome
from jobsvc.listen import JobListener
from jobsvc.metrics import Metrics
from jobsvc.runner.attempt import Attempt
from jobsvc.runner.completer import Completer, discard_result_file
from jobsvc.runner.context import RunnerContext
from jobsvc.runner.executor import Executor
from jobsvc.runner.faults import FaultHooks
from jobsvc.runner.idle_work import IdleWorkConverter
from jobsvc.runner.leases import Leases
from jobsvc.runner.maintenance import LIVE_RUNNERS, ClockSync, CountFolder, Pruner, Rescuer
from jobsvc.runner.pool import ProcessPool
from jobsvc.runner.producer import Producer
from jobsvc.runner.writes import WriteBatch
from jobsvc.settings import Settings

log = logging.getLogger("jobsvc.runner")
DEFAULT_QUEUE = "default"


class Runner:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        *,
        host: str | None = None,
        metrics: Metrics | None = None,
        faults: FaultHooks | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.metrics = metrics or Metrics()
        self.host = host or socket.gethostname()
        self.runner_id = repo.new_runner_id(self.host)
        self.files = FileStore.for_settings(settings)
        self.faults = faults or FaultHooks()
        self.stopping = False
        self.writes = WriteBatch(db)
        context = RunnerContext(settings, db, self.writes, self.runner_id)
        self.pool = ProcessPool(settings, settings.workers)
        self.leases = Leases(context, self._lost)
        self.executor = Executor(self.files, self._save_progress, self.faults)
        self.completer = Completer(
            context, self.leases, self.files, self.faults, self._notify_later
        )
        # One queue for now; named queues each get a producer with their own slots.
        self.producers = {
            DEFAULT_QUEUE: Producer(
                DEFAULT_QUEUE,
                settings.workers,
                context,
                claimed=self.leases.hold,
                start=self._start,
                drop=self.leases.release,
                hand_back=self._hand_back,
            )
        }
        upkeep = max(0.5, settings.lease_seconds / 3)
        self.rescuer = Rescuer(
            db, self.host, upkeep, self.leases.held_ids, self.notify, self.metrics
        )
        self.maintenance = [
            self.rescuer,
            Pruner(db, self.files, settings.retention_days, first_delay=upkeep),
            CountFolder(db),
        ]
        if not db.is_sqlite:
            self.maintenance.append(ClockSync(db, upkeep))
        self._listener: JobListener | None = None
        self._attempts: set[asyncio.Task[None]] = set()
        self._progress_writes: dict[str, float] = {}
        self._progress_tasks: set[asyncio.Task[None]] = set()

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        LIVE_RUNNERS.add(self.runner_id)
        if self.files is not None:
            try:
                self.files.prepare()  # workers write large results there, whatever the input
            except OSError as error:  # a read-only disk, say: serve anyway, as for the database
                log.error("cannot make the files directory %s: %s", self.files.root, error)
        if not self.db.is_sqlite:
            with contextlib.suppress(StorageUnavailable):
                await self.db.sync_clock()
            self._listener = JobListener(self.settings.database_url, self.notify)
            await self._listener.start()
        await self.pool.start()
        try:
            await self.rescuer.run_once()
        except StorageUnavailable as error:
            # Serve anyway: the API answers 503 until the storage is back, and the rescuer
            # runs again then.
            log.error("start-up recovery failed: %s", error)
        await self.leases.start()
        for service in self.maintenance:
            await service.start()
        for producer in self.producers.values():
            await producer.start()
        log.info("runner %s started with %d workers", self.runner_id, self.settings.workers)

    async def stop(self, grace: float | None = None) -> None:
        """Claim no more; give running attempts ``grace`` seconds, then hand them back."""
        grace = self.settings.shutdown_grace if grace is None else grace
        self.stopping = True
        if self._listener is not None:
            await self._listener.stop()
        for producer in self.producers.values():
            await producer.stop()
        if self._attempts:
            log.info("stopping: %d running jobs get %g s to finish", len(self._attempts), grace)
            await asyncio.wait(set(self._attempts), timeout=grace)
        for attempt in self.leases.held():  # those whose outcome is written already: no matter
            attempt.interrupted = True
            attempt.kill()
        if self._attempts:
            await asyncio.wait(set(self._attempts), timeout=10)
        left = await self.completer.drain(timeout=self.settings.lease_seconds)
        if left:
            log.error("%d outcomes could not be written; their jobs will be rescued", left)
        await self._release_leftovers()
        await self.leases.stop()
        for service in self.maintenance:
            await service.stop()
        await self.writes.close()
        await self.pool.close()
        LIVE_RUNNERS.discard(self.runner_id)

    def idle_work(self, fallback: Converter) -> Converter:
        """The API's conversions and upload checks, on this runner's idle worker processes
        when there are some, else on ``fallback`` (the idle-work policy, ``idle_work``)."""
        return IdleWorkConverter(self.pool, fallback, lambda: self.stopping)

    def kill_now(self) -> None:
        """Kill every worker process at once, writing nothing (a second stop signal)."""
        self.stopping = True
        self.pool.kill_all()

    def notify(self) -> None:
        """There may be new work: look now instead of at the next poll."""
        for producer in self.producers.values():
            producer.notify()

    async def wake(self) -> None:
        """``notify`` as a coroutine, for ``BackgroundTasks`` (which runs plain functions in a
        thread, where an ``asyncio.Event`` must not be touched)."""
        self.notify()

    def abort(self, job_id: str) -> bool:
        """Stop a running attempt here now (its job was cancelled, or is no longer ours)."""
        attempt = self.leases.get(job_id)
        if attempt is None:
            return False
        attempt.aborted = True
        attempt.kill()
        return True

    # --- one attempt ---------------------------------------------------------------------------

    def _start(self, attempt: Attempt) -> None:
        if attempt.fetched_ahead:
            self._note_start(attempt)
        with logs.job_context(attempt.job_id, attempt.number):  # the task copies the context
            task = asyncio.create_task(self._run(attempt), name=f"jobsvc-job-{attempt.job_id}")
        self._attempts.add(task)
        task.add_done_callback(self._attempts.discard)

    async def _run(self, attempt: Attempt) -> None:
        producer = self.producers[attempt.queue]
        process = await self.pool.take(attempt.job_id)  # the one holding its upload, if any
        attempt.process = process
        started = time.monotonic()
        try:
            outcome = await self.executor.run(attempt)
        finally:
            attempt.process = None
            # Back in the pool before the slot's next claim is submitted (replaced if it died).
            self.pool.give_back(process)
        seconds = time.monotonic() - started
        if attempt.aborted:
            self.leases.release(attempt)
            producer.slot_freed(seconds)
            await discard_result_file(self.files, outcome)
            return
        self._observe(attempt, outcome, seconds)
        # The outcome, the start of the next ready job and the claim for the room it leaves:
        # submitted in the same moment, they share one transaction.
        self.completer.complete(attempt, outcome)
        producer.slot_freed(seconds)

    def _hand_back(self, attempt: Attempt) -> None:
        """A job claimed as the runner stops: back to the queue, uncounted, never started."""
        self.completer.complete(attempt, Outcome(interrupted=True))

    def _note_start(self, attempt: Attempt) -> None:
        """A job fetched ahead starts only now: its ``started_at`` says so (a fenced write, in
        the transaction of the outcome that freed its slot)."""
        now = self.db.now()

        async def write(conn: AsyncConnection) -> None:
            await repo.mark_started(conn, attempt.job_id, self.runner_id, attempt.number, now)

        noted = self.writes.submit(write)
        noted.add_done_callback(_ignore_failure)  # a start time is a hint, not a transition

    def _lost(self, attempt: Attempt) -> None:
        """Its lease is gone (cancelled, or taken over by another instance)."""
        self.abort(attempt.job_id)

    def _observe(self, attempt: Attempt, outcome: Outcome, seconds: float) -> None:
        if outcome.interrupted:
            return
        if outcome.result is not None:
            self.metrics.observe_attempt(attempt.job.task, seconds, "succeeded")
        elif outcome.error is not None:
            self.metrics.observe_attempt(attempt.job.task, seconds, "failed", outcome.error.type)

    def _save_progress(self, attempt: Attempt, value: float) -> None:
        """Store a progress report; one write under way per attempt, the latest value wins."""
        pending = attempt.job_id in self._progress_writes
        self._progress_writes[attempt.job_id] = value
        if not pending:
            writing = asyncio.create_task(self._write_progress(attempt))
            self._progress_tasks.add(writing)
            writing.add_done_callback(self._progress_tasks.discard)

    async def _write_progress(self, attempt: Attempt) -> None:
        while attempt.job_id in self._progress_writes:
            value = self._progress_writes[attempt.job_id]

            async def write(conn: AsyncConnection, value: float = value) -> bool:
                return await repo.save_progress(
                    conn, attempt.job_id, self.runner_id, attempt.number, value, self.db.now()
                )

            try:
                await self.writes.submit(write)
            except Exception as error:  # progress is a hint: the next report tries again
                log.debug("saving progress of job %s failed: %s", attempt.job_id, error)
            if self._progress_writes.get(attempt.job_id) == value:
                del self._progress_writes[attempt.job_id]

    def _notify_later(self, seconds: float) -> None:
        asyncio.get_running_loop().call_later(max(0.0, seconds), self.notify)

    async def _release_leftovers(self) -> None:
        """Whatever this runner still holds in the table goes back to the queue, uncounted."""
        held = self.leases.held_ids()
        try:
            async with self.db.write() as conn:
                released = await repo.release_all(conn, self.runner_id, self.db.now(), held)
        except StorageUnavailable as error:
            log.warning("cannot hand back the last jobs (%s): they will be rescued", error)
            return
        if released:
            log.info("handed %d running jobs back to the queue", released)


def _ignore_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: a failed hint is no one's error
