"""The worker processes: started from the fork server, supervised, replaced when they die.

A ``WorkerProcess`` is one process and the socket to it, read and written on the event loop.
The ``ProcessPool`` keeps ``size`` of them; ``take`` hands out an idle one (a process that
died while idle is replaced first, so its death costs no job an attempt), ``give_back``
returns it (replaced if it died meanwhile). A process that holds a checked upload's table
(``held_job``, see ``idle_work``) is handed to that job's attempt when it asks for it, and to
others only when no other process is idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import signal
import socket
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any

from jobsvc import processes
from jobsvc.runner import child
from jobsvc.runner.protocol import FRAME_HEADER, SMALL_MESSAGE_BYTES, frame
from jobsvc.settings import Settings

log = logging.getLogger("jobsvc.runner")
_WRITE_PIECE_BYTES = 1024 * 1024


class ProcessGone(Exception):
    """The worker process died, or its socket broke, before it answered."""


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
    if exitcode == child.EXIT_TASK_ENDED_PROCESS:
        return "its worker process ended: the task raised SystemExit or KeyboardInterrupt"
    return f"its worker process exited with status {exitcode}"


class WorkerProcess:
    """One worker process and the socket to it."""

    def __init__(
        self, process: BaseProcess, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.process = process
        self._reader = reader
        self._writer = writer
        # The job whose upload this process checked and whose table it holds (``idle_work``);
        # whatever it is sent next ends that.
        self.held_job: str | None = None

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
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return bool(self.process.is_alive())

    @property
    def exit_description(self) -> str:
        return describe_exit(self.process.exitcode)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, ValueError):
            self.process.kill()

    async def stop_now(self) -> None:
        """Kill the process and wait until it is gone, so that ``alive`` is false."""
        self.kill()
        await self.join(5)

    async def close(self) -> None:
        if self.alive and not self._writer.is_closing():
            # Asks the process to exit. Its socket may break meanwhile: uvloop then raises
            # RuntimeError rather than OSError, and a write to it may never drain.
            with contextlib.suppress(OSError, RuntimeError, TimeoutError):
                async with asyncio.timeout(2):
                    await self.send(None)
        await self.join(2)
        if self.process.is_alive():
            self.kill()
            await self.join(2)
        self._writer.close()
        with contextlib.suppress(OSError, RuntimeError):
            await self._writer.wait_closed()

    async def send(self, message: object) -> None:
        """Write one message; ``ProcessGone`` if the socket is broken."""
        self.held_job = None
        header, payload = frame(message)
        try:
            if len(payload) <= SMALL_MESSAGE_BYTES:
                # One write, one system call, one wake-up of the process.
                self._writer.write(header + payload)
                await self._writer.drain()
                return
            self._writer.write(header)
            view = memoryview(payload)
            # A piece at a time, each drained before the next: handed over whole, a large
            # input would be copied into the transport's buffer at once, stalling the loop.
            for start in range(0, len(view), _WRITE_PIECE_BYTES):
                self._writer.write(view[start : start + _WRITE_PIECE_BYTES])
                await self._writer.drain()
        except (OSError, RuntimeError) as error:  # uvloop: RuntimeError for a closed socket
            raise ProcessGone(str(error)) from error

    async def receive(self) -> tuple[str, Any]:
        """The next message: ``(kind, payload)``; ``ProcessGone`` at end-of-file."""
        try:
            # Gathered as it arrives: a large result holds the loop only for its final copies.
            header = await self._reader.readexactly(FRAME_HEADER.size)
            (size,) = FRAME_HEADER.unpack(header)
            payload = await self._reader.readexactly(size)
        except (EOFError, OSError) as error:  # asyncio.IncompleteReadError is an EOFError
            raise ProcessGone(str(error)) from error
        message: tuple[str, Any] = pickle.loads(payload)  # noqa: S301 - our own worker process
        return message

    async def join(self, seconds: float) -> None:
        """``Process.join(seconds)`` that leaves the loop free meanwhile."""
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
        target=child.main,
        args=(
            theirs,
            settings.task_modules,
            processes.NICENESS,
            settings.worker_memory_mb,
            (settings.log_level, settings.log_format),
            settings.converter_memory_mb,
        ),
        name="jobsvc-worker",
        daemon=True,
    )
    try:
        process.start()
    finally:
        theirs.close()  # so a dead child shows as end-of-file on our side
    return process, ours


class ProcessPool:
    """``size`` worker processes; each is idle in the pool or taken by one attempt."""

    def __init__(self, settings: Settings, size: int) -> None:
        self.settings = settings
        self.size = size
        self._idle: list[WorkerProcess] = []
        self._returned = asyncio.Event()
        self.processes: list[WorkerProcess] = []
        self._threads = ThreadPoolExecutor(max_workers=size, thread_name_prefix="jobsvc-spawn")
        self._context: BaseContext | None = None
        self._closing = False
        self._replacing: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        # Starting the fork server imports pandas there: a thread, not the loop.
        self._context = await asyncio.to_thread(processes.process_context)
        started = await asyncio.gather(*(self._spawn() for _ in range(self.size)))
        for process in started:
            self._put(process)

    async def take(self, job_id: str | None = None) -> WorkerProcess:
        """An idle, live process (waits for one to be given back): the one holding
        ``job_id``'s table if it is idle, else preferably one that holds nothing."""
        while (process := self._pick(job_id)) is None:
            self._returned.clear()
            await self._returned.wait()
        if not process.alive:  # died while idle (killed, out of memory): no job's attempt
            log.warning("worker process %s died while idle; replacing it", process.pid)
            process = await self.replace(process)
        return process

    def take_now(self) -> WorkerProcess | None:
        """An idle, live process that holds nothing, if there is one right now."""
        for process in self._idle:
            if process.held_job is None and process.alive:
                self._idle.remove(process)
                return process
        return None

    def holder_of(self, job_id: str) -> WorkerProcess | None:
        """The idle process that holds ``job_id``'s table, taken, if there is one."""
        for process in self._idle:
            if process.held_job == job_id:
                self._idle.remove(process)
                return process
        return None

    def _pick(self, job_id: str | None) -> WorkerProcess | None:
        if not self._idle:
            return None
        chosen = self._idle[0]
        for process in self._idle:
            if job_id is not None and process.held_job == job_id:
                chosen = process
                break
            if chosen.held_job is not None and process.held_job is None:
                chosen = process
        self._idle.remove(chosen)
        return chosen

    def _put(self, process: WorkerProcess) -> None:
        self._idle.append(process)
        self._returned.set()

    def give_back(self, process: WorkerProcess) -> None:
        """Return a process after its work; one that died is replaced in the background
        (``take`` waits for the replacement)."""
        if process.alive or self._closing:
            self._put(process)
            return
        replacing = asyncio.create_task(self._replace_into_pool(process))
        self._replacing.add(replacing)
        replacing.add_done_callback(self._replacing.discard)

    async def _replace_into_pool(self, process: WorkerProcess) -> None:
        self._put(await self.replace(process))

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.pid is not None]

    async def replace(self, process: WorkerProcess) -> WorkerProcess:
        """A new process for one that died. Until one starts, the dead one holds its place:
        a place lost to an error would leave the pool smaller for good."""
        if process in self.processes:
            self.processes.remove(process)
        await process.close()
        while True:
            try:
                return await self._spawn()
            except Exception:
                log.exception("cannot start a worker process; trying again in 1 s")
                await asyncio.sleep(1)

    async def _spawn(self) -> WorkerProcess:
        assert self._context is not None, "the pool has not started"
        process = await WorkerProcess.start(self._context, self.settings, self._threads)
        self.processes.append(process)
        return process

    def kill_all(self) -> None:
        """Kill every process at once (a second stop signal: no grace, no database)."""
        for process in self.processes:
            process.kill()

    async def close(self) -> None:
        self._closing = True
        for replacing in list(self._replacing):
            replacing.cancel()
        await asyncio.gather(*self._replacing, return_exceptions=True)
        await asyncio.gather(*(p.close() for p in self.processes))
        self._threads.shutdown(wait=False, cancel_futures=True)
