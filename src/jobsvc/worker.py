"""The runner: claims due jobs and runs them in worker processes.

A ``Dispatcher`` owns ``JOBSVC_WORKERS`` long-lived worker processes (forked from a server
process that has pandas imported, so a replacement starts in milliseconds). Its claim loop
waits for an idle process, claims the next due job in one statement, and hands it over. While
the attempt runs, a heartbeat renews the job's lease; when it ends, the outcome (result,
error, retry or failure) is written in one fenced transaction, which also claims the
process's next job; after a short job it claims one more, held to start the moment the
running one ends, so that the process never waits for a commit between jobs. The claim loop
sleeps until it is woken (a submit's background task, a retry coming due) or until
``poll_seconds`` pass, which is how it sees work submitted by other processes.

A CSV or NDJSON upload is checked (parsed) before its job is stored. When a worker process
is idle then, the check runs there (``check_upload``) and the process keeps the table; once
the job is committed, ``run_checked`` claims that one job for that process, which runs it
with the table it already has: nothing is written for it or read back. Otherwise the API's
converter processes check the upload and leave the table as a file (see ``files``). The
API's other conversions (rendering a result, parsing a large JSON body) run on an idle worker
process the same way (``convert_on_idle``), so that a converter process is started only
while every worker is busy. Idle processes stay in the pool while the claim loop claims, for
that reason; a job claimed for one taken meanwhile goes back to the queue, uncounted.

What can go wrong with a worker process, and what the job's record says:
- the task raises: its exception type, message and traceback;
- it runs past its timeout: the process is killed, ``TimeoutError``;
- the process dies (segfault, out of memory, ``kill -9``): ``WorkerLost`` with the exit status;
- the whole service dies: the lease expires (or, on the same host, the owner's pid is gone)
  and any instance's sweep puts the job back with ``WorkerLost``.
Every one of them is a counted attempt; the job retries with backoff until ``max_attempts``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import multiprocessing
import os
import pickle
import random
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any

from jobsvc import formats, logs, retention, worker_process
from jobsvc import repository as repo
from jobsvc.db import Database
from jobsvc.errors import StorageUnavailable
from jobsvc.files import FileStore
from jobsvc.listen import JobListener
from jobsvc.metrics import Metrics
from jobsvc.records import AttemptError, ResultData
from jobsvc.settings import Settings

log = logging.getLogger("jobsvc.worker")

# Worker processes yield the CPU to the API process: a slow job should never slow a request.
WORKER_NICENESS = 10
# Dispatchers alive in this process, so a sweep can tell a previous incarnation (dead) from a
# sibling (another app in the same process) when both carry this process's pid.
_LIVE_WORKER_IDS: set[str] = set()
_WRITE_PIECE_BYTES = 1024 * 1024
# After a job shorter than this, a worker process's next claim holds one job more, to start
# the moment the running one ends (``Dispatcher._run``).
HOLD_AHEAD_BELOW_SECONDS = 1.0


def process_context() -> BaseContext:
    """The multiprocessing context for every process jobsvc starts.

    A forkserver: the service process has threads (the event loop's helpers, the database
    driver's), which a plain fork would copy in an unknown state. The server preloads the
    worker module, so pandas is imported once and every worker is a cheap fork of it.
    """
    for name, value in worker_process.THREAD_LIMITS.items():
        # Set before the fork server starts, so its imports and every worker see them.
        os.environ.setdefault(name, value)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["jobsvc.worker_process"])
    return context


def retry_delay(base_seconds: float, attempt: int, cap_seconds: float) -> float:
    """Exponential backoff with jitter: about base, twice that, four times, ... up to the cap."""
    delay: float = min(cap_seconds, base_seconds * 2.0 ** max(0, attempt - 1))
    jitter: float = random.uniform(0, delay / 2)  # noqa: S311 - spreading retries, not security
    return delay / 2 + jitter


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "its worker process stopped answering"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (out of memory?)" if -exitcode == signal.SIGKILL else ""
        return f"its worker process was killed by {name}{hint}"
    return f"its worker process exited with status {exitcode}"


class ConverterPool:
    """The API's processes for parsing uploads and rendering results.

    A pool whose process died (killed, out of memory) refuses all further work; this one is
    replaced and the call tried once more, so one lost process never breaks the API.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._pool = self._new()

    def _new(self) -> ProcessPoolExecutor:
        # Parsing a large upload is as CPU-heavy as a task: it yields to the API like one.
        return ProcessPoolExecutor(
            max_workers=self.size,
            mp_context=process_context(),
            initializer=os.nice,
            initargs=(WORKER_NICENESS,),
        )

    async def run(self, func: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        call = functools.partial(worker_process.call_and_release, functools.partial(func, *args))
        try:
            return await loop.run_in_executor(self._pool, call)
        except BrokenProcessPool:
            log.warning("a converter process died; starting a new pool")
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new()
            return await loop.run_in_executor(self._pool, call)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class WorkerProcess:
    """One worker process and the socket to it, read and written on the event loop."""

    def __init__(
        self, process: BaseProcess, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.process = process
        self._reader = reader
        self._writer = writer

    @classmethod
    async def start(
        cls, context: BaseContext, settings: Settings, threads: ThreadPoolExecutor
    ) -> WorkerProcess:
        loop = asyncio.get_running_loop()
        # Starting waits on the fork server, so in a thread; the streams belong to the loop.
        starting = loop.run_in_executor(threads, _start_process, context, settings)
        try:
            process, sock = await asyncio.shield(starting)
        except asyncio.CancelledError:
            # Stopped meanwhile (the service is shutting down): what starts is no one's.
            starting.add_done_callback(_kill_when_started)
            raise
        try:
            reader, writer = await asyncio.open_connection(sock=sock)
        except BaseException:
            _kill_and_close(process, sock)
            raise
        return cls(process, reader, writer)

    @property
    def alive(self) -> bool:
        return bool(self.process.is_alive())

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, ValueError):
            self.process.kill()

    async def stop_now(self) -> None:
        """Kill the process and wait until it is gone, so that ``alive`` is false."""
        self.kill()
        await self._join(5)

    async def close(self) -> None:
        if self.alive and not self._writer.is_closing():
            # Asks the process to exit. Its socket may break meanwhile: uvloop then raises
            # RuntimeError rather than OSError, and a write to it may never drain.
            with contextlib.suppress(OSError, RuntimeError, TimeoutError):
                async with asyncio.timeout(2):
                    await self._send(None)
        await self._join(2)
        if self.process.is_alive():
            self.kill()
            await self._join(2)
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    async def run(
        self,
        request: worker_process.RunRequest,
        on_progress: Callable[[float], Awaitable[None]],
        timeout: float | None,  # noqa: ASYNC109 - the task's own limit, enforced by killing
        *,
        sent: bool = False,  # by ``send_now``
    ) -> ResultData | AttemptError:
        try:
            if not sent:
                await self._send(request)
            async with asyncio.timeout(timeout):
                while True:
                    kind, payload = await self._receive()
                    if kind == "progress":
                        await on_progress(payload)
                        continue
                    outcome: ResultData | AttemptError = payload
                    return outcome
        except TimeoutError:
            await self.stop_now()  # and the process is replaced
            return AttemptError(
                "TimeoutError",
                f"the task ran longer than its {timeout:g} s timeout; its worker process was "
                "stopped",
            )
        except (EOFError, OSError):  # asyncio.IncompleteReadError is an EOFError
            await self._join(5)
            return AttemptError("WorkerLost", describe_exit(self.process.exitcode))

    def send_now(self, request: worker_process.RunRequest) -> bool:
        """Write a job's request to the socket at once, without waiting for the loop: True if
        it went; False for a large input, or a socket that cannot take it (``run`` sends it
        then, and meets the same fault)."""
        small = worker_process.SMALL_MESSAGE_BYTES
        if request.input_data is not None and len(request.input_data) > small:
            return False  # not worth pickling to find out
        payload = pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)
        if len(payload) > small or self._writer.is_closing():
            return False
        try:
            self._write_whole(payload)
        except (OSError, RuntimeError):  # uvloop: RuntimeError for a closed socket
            return False
        return True

    async def ask(self, message: object) -> tuple[str, Any]:
        """Send ``message`` and wait for the one reply: ``(kind, payload)``. EOFError or
        OSError if the process dies meanwhile."""
        await self._send(message)
        reply: tuple[str, Any] = await self._receive()
        return reply

    async def _send(self, message: object) -> None:
        payload = memoryview(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
        if len(payload) <= worker_process.SMALL_MESSAGE_BYTES:  # a job's request, mostly
            self._write_whole(payload)
            await self._writer.drain()
            return
        self._writer.write(worker_process.FRAME_HEADER.pack(len(payload)))
        # A piece at a time, each drained before the next: handed over whole, a large input
        # would be copied into the transport's buffer at once, stalling the loop meanwhile.
        for start in range(0, len(payload), _WRITE_PIECE_BYTES):
            self._writer.write(payload[start : start + _WRITE_PIECE_BYTES])
            await self._writer.drain()

    def _write_whole(self, payload: bytes | memoryview) -> None:
        """A small message and its header in one write: one system call, one wake-up."""
        self._writer.write(worker_process.FRAME_HEADER.pack(len(payload)) + payload)

    async def _receive(self) -> Any:
        # Gathered as it arrives: a large result holds the loop only for its final copies.
        header = await self._reader.readexactly(worker_process.FRAME_HEADER.size)
        (size,) = worker_process.FRAME_HEADER.unpack(header)
        payload = await self._reader.readexactly(size)
        return pickle.loads(payload)  # noqa: S301 - from our own worker process

    async def _join(self, seconds: float) -> None:
        """``Process.join(seconds)`` that leaves the loop free to run other jobs meanwhile."""
        if not self.process.is_alive():
            return
        loop = asyncio.get_running_loop()
        exited = asyncio.Event()
        # The sentinel turns readable when the process ends (forkserver: its exit status).
        loop.add_reader(self.process.sentinel, exited.set)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(exited.wait(), seconds)
        finally:
            loop.remove_reader(self.process.sentinel)
        self.process.join(0)  # collects the exit status, if it is there


def _kill_and_close(process: BaseProcess, sock: socket.socket) -> None:
    sock.close()
    with contextlib.suppress(ProcessLookupError, ValueError):
        process.kill()


def _kill_when_started(started: asyncio.Future[tuple[BaseProcess, socket.socket]]) -> None:
    if not started.cancelled() and started.exception() is None:
        _kill_and_close(*started.result())


def _start_process(context: BaseContext, settings: Settings) -> tuple[BaseProcess, socket.socket]:
    ours, theirs = socket.socketpair()
    process = context.Process(  # type: ignore[attr-defined]
        target=worker_process.main,
        args=(
            theirs,
            settings.task_modules,
            WORKER_NICENESS,
            settings.worker_memory_mb,
            (settings.log_level, settings.log_format),
        ),
        name="jobsvc-worker",
        daemon=True,
    )
    try:
        process.start()
    finally:
        theirs.close()  # so a dead child shows as end-of-file on our side
    return process, ours


@dataclass
class Attempt:
    """A claimed job on one worker process: running there, or held to run next."""

    job: repo.JobRow
    stored: repo.JobRow | None  # its input row, None without one
    process: WorkerProcess
    aborted: bool = False
    started: bool = False  # sent to its process (a held attempt waits for the one before)
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    heartbeat: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def job_id(self) -> str:
        return str(self.job.id)

    @property
    def number(self) -> int:
        return int(self.job.attempts)


class Dispatcher:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        *,
        host: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.metrics = metrics or Metrics()
        self.host = host or socket.gethostname()
        self.worker_id = repo.new_worker_id(self.host)
        self.files = FileStore.for_settings(settings)
        self.running: dict[str, Attempt] = {}
        self._wake = asyncio.Event()
        self._idle: asyncio.Queue[WorkerProcess] = asyncio.Queue()
        self._processes: list[WorkerProcess] = []
        self._threads = ThreadPoolExecutor(
            max_workers=settings.workers, thread_name_prefix="jobsvc-spawn"
        )
        self._context = process_context()
        self._loops: list[asyncio.Task[None]] = []
        self._listener: JobListener | None = None
        self._stopping = False
        self._found_nothing_at = -math.inf  # when a runner's claim last found no job due

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        _LIVE_WORKER_IDS.add(self.worker_id)
        if self.files is not None:
            try:
                self.files.prepare()  # workers write large results there, whatever the input
            except OSError as error:  # a read-only disk, say: serve anyway, as for the database
                log.error("cannot make the files directory %s: %s", self.files.root, error)
        if not self.db.is_sqlite:
            await self.db.sync_clock()
            self._listener = JobListener(self.settings.database_url, self.notify)
            await self._listener.start()
        for _ in range(self.settings.workers):
            self._idle.put_nowait(await self._spawn())
        try:
            await self.recover()
        except StorageUnavailable as error:
            # Serve anyway: the API answers 503 until the storage is back, and the sweep
            # runs the recovery again then.
            log.error("start-up recovery failed: %s", error)
        self._loops = [
            asyncio.create_task(self._claim_loop(), name="jobsvc-claim"),
            asyncio.create_task(self._sweep_loop(), name="jobsvc-sweep"),
        ]
        log.info("dispatcher %s started with %d workers", self.worker_id, self.settings.workers)

    async def stop(self, grace: float | None = None) -> None:
        """Stop claiming; give running attempts ``grace`` seconds, then hand them back."""
        grace = self.settings.shutdown_grace if grace is None else grace
        self._stopping = True
        if self._listener is not None:
            await self._listener.stop()
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        pending = [a.task for a in self.running.values() if a.task is not None]
        if pending:
            await asyncio.wait(pending, timeout=grace)
        for attempt in list(self.running.values()):
            self.abort(attempt.job_id)
        remaining = [a.task for a in self.running.values() if a.task is not None]
        if remaining:
            await asyncio.wait(remaining, timeout=10)
        # Whatever this dispatcher still holds goes back to the queue, uncounted, at once.
        with contextlib.suppress(StorageUnavailable):
            async with self.db.write() as conn:
                released = await repo.release_all(conn, self.worker_id, self.db.now())
            if released:
                log.info("handed %d running jobs back to the queue", released)
        await asyncio.gather(*(p.close() for p in self._processes))
        self._threads.shutdown(wait=False, cancel_futures=True)
        _LIVE_WORKER_IDS.discard(self.worker_id)

    def notify(self) -> None:
        """There may be new work: look now instead of at the next poll."""
        self._wake.set()

    async def wake(self) -> None:
        """``notify`` as a coroutine, for ``BackgroundTasks`` (which runs plain functions in a
        thread, where an ``asyncio.Event`` must not be touched)."""
        self.notify()

    def abort(self, job_id: str) -> bool:
        """Stop a running attempt here now (its job was cancelled, or is no longer ours)."""
        attempt = self.running.get(job_id)
        if attempt is None:
            return False
        attempt.aborted = True
        if attempt.started:  # one held ahead is dropped when its turn comes
            attempt.process.kill()
        return True

    # --- uploads checked where they will run ---------------------------------------------------

    def take_idle(self) -> WorkerProcess | None:
        """An idle worker process, taken out of the pool for ``check_upload``; None if there
        is none right now (the upload is then checked by the API's converter processes)."""
        if self._stopping or self._idle.empty():
            return None
        process = self._idle.get_nowait()
        if not process.alive:
            self._idle.put_nowait(process)  # the claim loop replaces it
            return None
        return process

    async def check_upload(
        self,
        process: WorkerProcess,
        job_id: str,
        path: str,
        media_type: str,
        limits: formats.Limits,
        digest: bool,
    ) -> formats.ParsedUpload | None:
        """Parse and check an upload in ``process`` (from ``take_idle``), which then holds the
        table for the job: hand it to ``run_checked`` or ``release_checked``. The refusal of a
        bad upload is raised (the process is back in the pool then); None if the process died
        meanwhile (out of memory, say: the caller checks the upload elsewhere)."""
        request = worker_process.CheckRequest(job_id, path, media_type, limits, digest)
        reply = await self._ask_taken(process, request)
        if reply is None:
            return None
        kind, payload = reply
        if kind == "error":
            self._idle.put_nowait(process)
            raise payload
        parsed: formats.ParsedUpload = payload
        return parsed

    async def convert_on_idle(self, func: Callable[[], Any]) -> tuple[bool, Any]:
        """``func()`` on an idle worker process, for the API: ``(True, its value)``, or
        ``(False, None)`` when none is idle or it died meanwhile (the caller runs it in a
        converter process then). Its error is raised. A worker process that is idle anyway
        does this work, instead of a converter process started, and kept, for it."""
        process = self.take_idle()
        if process is None:
            return False, None
        reply = await self._ask_taken(process, worker_process.ConvertRequest(func))
        if reply is None:
            return False, None
        self._idle.put_nowait(process)
        kind, payload = reply
        if kind == "error":
            if isinstance(payload, MemoryError):  # the worker's memory cap: not the data's fault
                return False, None
            raise payload
        return True, payload

    async def _ask_taken(self, process: WorkerProcess, request: object) -> tuple[str, Any] | None:
        """Ask a process from ``take_idle``; None if it died meanwhile (it is back in the pool
        then, where the claim loop replaces it)."""
        try:
            return await process.ask(request)
        except (EOFError, OSError):
            self._idle.put_nowait(process)
            return None
        except BaseException:
            # Stopped while it works (the service shutting down): its reply would be read as
            # the answer to the next request, so the process goes.
            process.kill()
            self._idle.put_nowait(process)
            raise

    async def run_checked(self, job_id: str, process: WorkerProcess) -> None:
        """Start the job whose upload ``process`` checked, there; if it is no longer waiting
        (another instance took it first), the process lets the table go."""
        if self._stopping or not process.alive:  # the job waits in the queue for a claim
            self._idle.put_nowait(process)
            return
        try:
            async with self.db.write() as conn:
                now = self.db.now()
                lease_until = now + timedelta(seconds=self.settings.lease_seconds)
                claimed = await repo.claim_one(conn, job_id, self.worker_id, now, lease_until)
        except Exception:
            log.exception("claiming job %s for its worker failed; it waits in the queue", job_id)
            claimed = None
        if claimed is None:
            await self.release_checked(process)
            return
        self._start_run(Attempt(*claimed, process))

    async def release_checked(self, process: WorkerProcess) -> None:
        """Give back a process from ``check_upload`` whose job will not run there."""
        with contextlib.suppress(EOFError, OSError, RuntimeError):  # uvloop: a closed socket
            await process.ask(worker_process.DropRequest())
        self._idle.put_nowait(process)

    # --- recovery ----------------------------------------------------------------------------

    def _owner_is_dead(self, owner: str) -> bool:
        host, _, rest = owner.partition(":")
        pid_text = rest.partition(":")[0]
        if host != self.host or not pid_text.isdigit():
            return False  # another machine's: only its lease expiry can tell
        pid = int(pid_text)
        if pid == os.getpid():
            return owner not in _LIVE_WORKER_IDS
        return not _pid_alive(pid)

    async def recover(self) -> list[tuple[str, str]]:
        """Put back the jobs of workers that are gone: dead processes here, expired leases."""
        async with self.db.write() as conn:
            owners = await repo.running_lease_owners(conn)
            dead = [owner for owner in owners if self._owner_is_dead(owner)]
            changed = await repo.reclaim_lost(conn, self.db.now(), dead)
            if changed:
                await repo.announce_due_jobs(conn)
        for job_id, status in changed:
            log.warning("job %s lost its worker; now %s", job_id, status)
            self.metrics.rescues.inc()
        if changed:
            self.notify()
        return changed

    async def _sweep_loop(self) -> None:
        interval = max(0.5, self.settings.lease_seconds / 3)
        next_prune = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            try:
                await self.db.sync_clock()
                await self.recover()
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + retention.PRUNE_EVERY_SECONDS
                    age = timedelta(days=self.settings.retention_days)
                    if pruned := await retention.prune(self.db, age, self.files):
                        log.info("pruned %d jobs finished more than %s ago", pruned, age)
            except StorageUnavailable as error:
                log.warning("sweep skipped: %s", error)
            except Exception:
                log.exception("sweep failed; trying again in %.1f s", interval)

    # --- claiming and running ------------------------------------------------------------------

    async def _spawn(self) -> WorkerProcess:
        process = await WorkerProcess.start(self._context, self.settings, self._threads)
        self._processes.append(process)
        return process

    async def _claim_in(
        self, conn: Any, limit: int, events: repo.Events | None = None
    ) -> list[tuple[repo.JobRow, repo.JobRow | None]]:
        now = self.db.now()
        lease_until = now + timedelta(seconds=self.settings.lease_seconds)
        return await repo.claim_with_inputs(
            conn, self.worker_id, now, lease_until, limit, events=events
        )

    async def _claim(self, limit: int) -> list[tuple[repo.JobRow, repo.JobRow | None]]:
        """Claim up to ``limit`` jobs, with their inputs, in one transaction."""
        async with self.db.write() as conn:
            return await self._claim_in(conn, limit)

    async def _claim_loop(self) -> None:
        while not self._stopping:
            # Processes stay in the pool until a claimed job is theirs: meanwhile the API's
            # conversions and upload checks find them there.
            idle = [await self._idle.get()]
            while not self._idle.empty():
                idle.append(self._idle.get_nowait())
            # One that died while idle (killed, out of memory) is replaced before it is given
            # a job: its death is no job's failed attempt.
            for process in idle:
                self._idle.put_nowait(process if process.alive else await self._replace(process))
            quiet = self.settings.poll_seconds - (time.monotonic() - self._found_nothing_at)
            if quiet > 0 and not self._wake.is_set():
                # A runner's claim found nothing due since the last poll, and nothing was
                # submitted since: wait for news instead of a claim that finds nothing.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), quiet)
                continue
            self._wake.clear()
            # Every idle process at once: one transaction (one disk flush) claims for all.
            wanted = self._idle.qsize()
            try:
                claimed = await self._claim(wanted)
            except StorageUnavailable as error:
                log.warning("cannot claim jobs now: %s", error)
                claimed = []
            except Exception:
                log.exception("claiming jobs failed; trying again shortly")
                claimed = []
            for job, stored in claimed:
                if self._idle.empty():  # taken meanwhile, to check an upload or to convert
                    await self._give_back(job)
                else:
                    self._start_run(Attempt(job, stored, self._idle.get_nowait()))
            if len(claimed) < wanted:  # nothing more is due: sleep until told or polled
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.settings.poll_seconds)

    def _track(self, attempt: Attempt) -> Attempt:
        """From its claim until its outcome is written: abortable, and its lease renewed."""
        self.running[attempt.job_id] = attempt
        attempt.heartbeat = asyncio.create_task(self._heartbeat(attempt))
        return attempt

    def _untrack(self, attempt: Attempt) -> None:
        if attempt.heartbeat is not None:
            attempt.heartbeat.cancel()
        # A retried job may already run again as a newer attempt: remove only our own.
        if self.running.get(attempt.job_id) is attempt:
            del self.running[attempt.job_id]

    def _start_run(self, attempt: Attempt) -> None:
        self._track(attempt)
        name = f"worker-{attempt.process.process.pid}"
        attempt.task = asyncio.create_task(self._run(attempt), name=name)

    async def _run(self, first: Attempt) -> None:
        """Run jobs on one worker process until none is due.

        The outcome of each attempt and the claim of the process's next jobs share one
        transaction, so a busy queue costs one commit per job. After a short job, the claim
        takes one job more than the process needs, held to run next: when an attempt ends,
        the held one starts at once and the commit overlaps it, instead of the process
        waiting for the commit between jobs. A long job holds nothing ahead, so no job
        waits behind it while another process could be free for it.
        """
        process = first.process
        current: Attempt | None = first
        held: Attempt | None = None
        running: asyncio.Task[tuple[ResultData | AttemptError, float]] | None
        running = self._begin(first)
        try:
            while current is not None and running is not None:
                finished, current = current, None
                try:
                    outcome, seconds = await running
                except Exception:
                    # Not the task's failure (that is an outcome): the job keeps its lease
                    # until it expires, and then a sweep retries it. The process may still
                    # run it, and its reply would be read as the next job's: it is replaced.
                    log.exception(
                        "job %s attempt %d: running it failed", finished.job_id, finished.number
                    )
                    self._untrack(finished)
                    await process.stop_now()
                    break
                running = None
                going_on = not self._stopping and process.alive
                if finished.aborted:
                    self._remove_result_file(outcome)
                    self._untrack(finished)
                    break
                if held is not None and held.aborted:  # cancelled before its turn
                    self._untrack(held)
                    held = None
                if held is not None and going_on:
                    current, held = held, None
                    running = self._begin(current)
                # One job for the process if none is held for it, and one to hold if the jobs
                # are short.
                wanted = int(current is None) + int(seconds < HOLD_AHEAD_BELOW_SECONDS)
                claimed = await self._finish(
                    finished, outcome, seconds, claim=wanted if going_on else 0, started=current
                )
                if going_on and wanted and not claimed:
                    self._found_nothing_at = time.monotonic()  # as good as a poll
                for attempt in claimed:
                    self._track(attempt)
                    attempt.task = asyncio.current_task()
                    if current is None:
                        current = attempt
                        running = self._begin(current)
                    else:
                        held = attempt
        finally:
            for left in (current, held):
                if left is not None and not left.started:
                    await self._hand_back(left)
            if not process.alive and not self._stopping:
                process = await self._replace(process)
            self._idle.put_nowait(process)

    async def _replace(self, process: WorkerProcess) -> WorkerProcess:
        """A new worker process for one that died. Until one starts, this process holds its
        slot: a slot lost to an error would leave the dispatcher with fewer workers for good."""
        self._processes.remove(process)
        await process.close()
        while True:
            try:
                return await self._spawn()
            except Exception:
                log.exception("cannot start a worker process; trying again in 1 s")
                await asyncio.sleep(1)

    def _begin(self, attempt: Attempt) -> asyncio.Task[tuple[ResultData | AttemptError, float]]:
        """Send the attempt to its process; the task gives its outcome and how long it ran.

        A small request is written here and now, not when the task first runs: after this
        the caller records the previous job's outcome, and the process would wait for that.
        """
        attempt.started = True
        try:
            request: worker_process.RunRequest | None = self._request_for(attempt)
        except Exception:  # raised again in the task, where a fault of the runner is handled
            request = None
        sent = request is not None and attempt.process.send_now(request)

        async def timed() -> tuple[ResultData | AttemptError, float]:
            started = time.monotonic()
            outcome = await self._execute(attempt, request, sent)
            return outcome, time.monotonic() - started

        with logs.job_context(attempt.job_id, attempt.number):  # the task copies the context
            return asyncio.create_task(timed())

    async def _finish(
        self,
        attempt: Attempt,
        outcome: ResultData | AttemptError,
        seconds: float,
        *,
        claim: int,
        started: Attempt | None,
    ) -> list[Attempt]:
        """Write the outcome, with ``claim`` more jobs claimed for the same process (the ones
        it runs next) in the same transaction."""
        try:
            with logs.job_context(attempt.job_id, attempt.number):
                # Should recording fail, a result file stays: the commit may have happened
                # all the same (a connection lost during COMMIT); the prune removes it if no
                # row does.
                claimed = await self._record(attempt, outcome, claim=claim, started=started)
        except Exception:
            # The job keeps its lease until it expires; then a sweep retries it.
            log.exception(
                "job %s attempt %d: recording its outcome failed", attempt.job_id, attempt.number
            )
            claimed = []
        self._untrack(attempt)
        self._observe(attempt.job.task, seconds, outcome)
        return [Attempt(job, stored, attempt.process) for job, stored in claimed]

    async def _hand_back(self, attempt: Attempt) -> None:
        """Put a job held for a process back in the queue, uncounted (its process died, or
        the service stops, before its turn)."""
        self._untrack(attempt)
        if attempt.aborted:  # cancelled or taken over: no longer ours to give back
            return
        await self._give_back(attempt.job)

    async def _give_back(self, job: repo.JobRow) -> None:
        """Put a job claimed here back in the queue, its attempt uncounted."""
        try:
            async with self.db.write() as conn:
                await repo.release(conn, job.id, self.worker_id, job.attempts, self.db.now())
        except Exception:  # its lease expires, and a sweep queues it again
            log.exception("handing back job %s failed", job.id)
        self.notify()

    def _remove_result_file(self, outcome: ResultData | AttemptError) -> None:
        """Remove the file of a result that will not be stored: in a thread and not waited
        for, since unlinking a large file takes the kernel milliseconds."""
        if isinstance(outcome, ResultData) and outcome.path and self.files is not None:
            loop = asyncio.get_running_loop()
            loop.run_in_executor(self._threads, self.files.remove, [outcome.path])

    def _observe(self, task: str, seconds: float, outcome: ResultData | AttemptError) -> None:
        if isinstance(outcome, ResultData):
            self.metrics.observe_attempt(task, seconds, "succeeded")
        else:
            self.metrics.observe_attempt(task, seconds, "failed", outcome.type)

    def _request_for(self, attempt: Attempt) -> worker_process.RunRequest:
        job, stored = attempt.job, attempt.stored
        input_path, input_cache = self._input_files(job.id, stored)
        return worker_process.RunRequest(
            job_id=job.id,
            attempt=job.attempts,
            task=job.task,
            params=job.params,
            input_format=stored.format if stored else "json",
            input_data=stored.data if stored else None,
            input_path=input_path,
            input_cache=input_cache,
            result_path=(
                str(self.files.path(self.files.result_name_for(job.id, job.attempts)))
                if self.files is not None
                else None
            ),
        )

    async def _execute(
        self, attempt: Attempt, request: worker_process.RunRequest | None, sent: bool
    ) -> ResultData | AttemptError:
        job = attempt.job
        if request is None:
            request = self._request_for(attempt)

        async def on_progress(value: float) -> None:
            async with self.db.write() as conn:
                held = await repo.save_progress(
                    conn, job.id, self.worker_id, job.attempts, value, self.db.now()
                )
            if not held:
                self.abort(job.id)

        return await attempt.process.run(request, on_progress, job.timeout_seconds, sent=sent)

    def _input_files(
        self, job_id: str, stored: repo.JobRow | None
    ) -> tuple[str | None, str | None]:
        """The input's file, and where the parsed copy of a kept upload would be."""
        if stored is None or not stored.path:
            return None, None
        if self.files is None:
            raise RuntimeError(f"job input {stored.path!r} is a file, but no JOBSVC_FILES_DIR")
        return str(self.files.path(stored.path)), str(
            self.files.path(self.files.cache_name_for(job_id))
        )

    async def _record(
        self,
        attempt: Attempt,
        outcome: ResultData | AttemptError,
        *,
        claim: int,
        started: Attempt | None,
    ) -> list[tuple[repo.JobRow, repo.JobRow | None]]:
        """Write the attempt's outcome (fenced) and, in the same transaction, claim ``claim``
        jobs for its process and note the start of the held one that ``started`` now."""
        job = attempt.job
        now = self.db.now()
        retry_at = None
        events: repo.Events = []  # both jobs' events in one statement: a round trip less
        async with self.db.write() as conn:
            if isinstance(outcome, ResultData):
                stored = await repo.finish_succeeded(
                    conn, job.id, self.worker_id, job.attempts, outcome, now, events=events
                )
                if not stored:  # fenced out: cancelled or taken over meanwhile
                    self._remove_result_file(outcome)
            else:
                if outcome.retryable and job.attempts < job.max_attempts:
                    delay = retry_delay(
                        job.retry_delay_seconds, job.attempts, self.settings.retry_max_seconds
                    )
                    retry_at = now + timedelta(seconds=delay)
                await repo.finish_failed_attempt(
                    conn,
                    job.id,
                    self.worker_id,
                    job.attempts,
                    outcome,
                    now,
                    retry_at,
                    events=events,
                )
            if started is not None:
                await repo.mark_started(conn, started.job_id, self.worker_id, started.number, now)
            claimed = await self._claim_in(conn, claim, events) if claim else []
            await repo.add_events(conn, events)
        if retry_at is not None:
            asyncio.get_running_loop().call_later((retry_at - now).total_seconds(), self.notify)
        return claimed

    async def _heartbeat(self, attempt: Attempt) -> None:
        interval = self.settings.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            lease_until = self.db.now() + timedelta(seconds=self.settings.lease_seconds)
            try:
                async with self.db.write() as conn:
                    held = await repo.renew_lease(
                        conn, attempt.job_id, self.worker_id, attempt.number, lease_until
                    )
            except Exception:
                log.exception("heartbeat for job %s failed", attempt.job_id)
                continue
            if not held:
                log.info("job %s is no longer ours (cancelled or taken over)", attempt.job_id)
                self.abort(attempt.job_id)
                return


def _pid_alive(pid: int) -> bool:
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


__all__ = ["Attempt", "Dispatcher", "WorkerProcess", "process_context", "retry_delay"]
