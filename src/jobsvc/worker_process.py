"""The body of a worker process: receive a job, run its task, send back the outcome; or
check an upload and hold its table for the job that will run it here next.

Runs in a child process, so pandas never competes with the event loop for the interpreter.
It does no database work: everything it learns goes back over its socket, and the service
writes it. A process that dies mid-job (segfault, out of memory, ``kill -9``) is noticed by
the service as end-of-file on the socket.

Messages both ways are framed the same: the pickle's length (``FRAME_HEADER``), then the pickle.
This side reads and writes blocking; the service's side is its event loop's streams.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import pickle
import resource
import socket
import struct
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow as pa

from jobsvc import formats, logs
from jobsvc.records import AttemptError, ResultData
from jobsvc.tasks import progress, registry
from jobsvc.tasks.registry import PermanentError, import_task_modules, resolve_function

# Heavy numeric libraries would start a thread per core; the API needs one of them.
THREAD_LIMITS = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
}
_PROGRESS_INTERVAL = 0.2
FRAME_HEADER = struct.Struct("!Q")  # the length of the pickle that follows
SMALL_MESSAGE_BYTES = 64 * 1024  # sent with its header in one write (a copy this size is free)
_RELEASE_AFTER_GROWTH_BYTES = 16 * 1024 * 1024
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class RunRequest:
    job_id: str
    attempt: int
    task: str
    params: dict[str, Any]
    input_format: str
    input_data: bytes | None
    input_path: str | None = None  # a file in the files directory, read instead of sent
    input_cache: str | None = None  # the kept upload's parsed copy, if this boot wrote one
    result_path: str | None = None  # where a large DataFrame result goes, when files are kept


@dataclass(frozen=True)
class CheckRequest:
    """Parse and check a kept CSV or NDJSON upload for job ``job_id``, and hold its table
    here for that job's run: the process that checks an upload then runs it, and nothing is
    copied between the two. The reply is the ``ParsedUpload``, or the error that refuses it."""

    job_id: str
    path: str
    media_type: str
    limits: formats.Limits
    digest: bool


@dataclass(frozen=True)
class DropRequest:
    """Forget a held table: its job will not run here (a replayed submit, a failed commit)."""


@dataclass(frozen=True)
class ConvertRequest:
    """Run ``func()`` for the API (render a result, parse a large JSON body) on this idle
    process, so that no converter process is started for it. The reply is its return value,
    or the error it raised."""

    func: Callable[[], Any]


def send_message(sock: socket.socket, message: object) -> None:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    header = FRAME_HEADER.pack(len(payload))
    if len(payload) <= SMALL_MESSAGE_BYTES:
        sock.sendall(header + payload)  # one system call, and one wake-up of the service
        return
    # Two writes: joining header and payload would copy a large result, under the memory cap.
    sock.sendall(header)
    sock.sendall(payload)


def receive_message(sock: socket.socket) -> Any:
    (size,) = FRAME_HEADER.unpack(_receive_exactly(sock, FRAME_HEADER.size))
    return pickle.loads(_receive_exactly(sock, size))  # noqa: S301 - from the service itself


def _receive_exactly(sock: socket.socket, size: int) -> bytearray:
    buffer = bytearray(size)
    view = memoryview(buffer)
    while view:
        received = sock.recv_into(view)
        if not received:
            raise EOFError("the service closed its end of the socket")
        view = view[received:]
    return buffer


def _progress_sender(sock: socket.socket) -> Any:
    last_sent = 0.0

    def send(value: float) -> None:
        nonlocal last_sent
        now = time.monotonic()
        # Fewer messages, fewer writes: a tight loop reporting progress must not flood the DB.
        if value >= 1.0 or now - last_sent >= _PROGRESS_INTERVAL:
            last_sent = now
            send_message(sock, ("progress", value))

    return send


def run(request: RunRequest, held: pd.DataFrame | None = None) -> ResultData:
    if request.input_format == "call":  # a function queued by add_task, by its import path
        args, kwargs = formats.decode_call(request.input_data or b"")
        function = resolve_function(request.task)
        return formats.encode_result(function(*args, **kwargs), request.result_path)
    task = registry.get(request.task)
    if task is None:
        raise LookupError(f"no task named {request.task!r} is registered in the worker")
    if held is not None:  # this process checked the upload: its table is here already
        return formats.encode_result(task.call(held, request.params), request.result_path)
    frame = formats.load_input(
        request.input_format, request.input_data, request.input_path, request.input_cache
    )
    if request.input_cache is not None:
        # Read once: its disk space is free again now (the mapping lives on), and a later
        # attempt parses the upload itself.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(request.input_cache)
    return formats.encode_result(task.call(frame, request.params), request.result_path)


def _cap_memory(megabytes: int | None) -> None:
    if megabytes is None:
        return
    limit = megabytes * 1024 * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def main(
    sock: socket.socket,
    task_modules: list[str],
    niceness: int,
    memory_mb: int | None = None,
    log: tuple[str, str] = ("info", "text"),
) -> None:
    if niceness:
        os.nice(niceness)
    _cap_memory(memory_mb)
    logs.configure(*log)
    import_task_modules(task_modules)
    progress.set_sink(_progress_sender(sock))
    # A checked upload's job, its table, and this process's size before the check.
    held: tuple[str, pd.DataFrame, int] | None = None
    while True:
        try:
            request = receive_message(sock)
        except (EOFError, OSError):
            return  # the service is gone
        if request is None:
            return
        resident = _resident_bytes()
        # One table at a time: whatever this process is asked next ends the one it holds.
        kept, held = held, None
        if isinstance(request, CheckRequest | DropRequest | ConvertRequest):
            del kept
            if isinstance(request, CheckRequest):
                held = _check(sock, request, resident)
            elif isinstance(request, ConvertRequest):
                _convert(sock, request)
            else:
                release_memory_above(0)  # the table was the growth: hand it back
                send_message(sock, ("ok", None))
            continue
        table = None
        if kept is not None and kept[0] == request.job_id:
            table, resident = kept[1], kept[2]
        del kept
        try:
            with logs.job_context(request.job_id, request.attempt):
                outcome = run(request, table)
            send_message(sock, ("ok", outcome))
        except BaseException as error:  # a task's SystemExit or MemoryError is its failure too
            failure = AttemptError(
                type(error).__name__,
                str(error),
                traceback.format_exc(),
                retryable=not isinstance(error, PermanentError),
            )
            send_message(sock, ("error", failure))
        table = None
        release_memory_above(resident)


def _check(
    sock: socket.socket, request: CheckRequest, resident: int
) -> tuple[str, pd.DataFrame, int] | None:
    """Answer a ``CheckRequest``; what to hold for the job, if the upload passed."""
    try:
        parsed, frame = formats.read_kept_upload(
            request.path, request.media_type, request.limits, digest=request.digest
        )
    except Exception as error:  # the refusal (malformed, too large) is the API's answer
        send_message(sock, ("error", error))
        return None
    send_message(sock, ("ok", parsed))
    return request.job_id, frame, resident


def _convert(sock: socket.socket, request: ConvertRequest) -> None:
    try:
        value = call_and_release(request.func)
    except Exception as error:  # a refusal (malformed data, say) is the API's answer
        send_message(sock, ("error", error))
    else:
        send_message(sock, ("ok", value))


def call_and_release(func: Callable[[], Any]) -> Any:
    """``func()``, then the memory it grew by handed back (for the API's conversions, which
    parse uploads and render results, in a converter or an idle worker process)."""
    resident = _resident_bytes()
    try:
        return func()
    finally:
        release_memory_above(resident)


def release_memory_above(resident: int) -> None:
    """Hand freed memory back to the system when the process has grown by a large job.

    malloc and Arrow's allocator keep what a job freed for their next allocations, so a
    process idle after parsing a 39 MB CSV held 120 MB more than before it; with a worker
    process per core that adds up. A small job skips this: trimming costs a heap walk.
    """
    if _resident_bytes() - resident < _RELEASE_AFTER_GROWTH_BYTES:
        return
    pa.default_memory_pool().release_unused()
    if _malloc_trim is not None:
        _malloc_trim(0)


# This process's /proc/self/statm, opened once: a read is then 2 µs, where opening it for each
# job cost 20 µs (1.8% of a small job). Keyed by pid, since a forked child inherits the fd.
_statm: tuple[int, int] | None = None


def _resident_bytes() -> int:
    global _statm
    try:
        if _statm is None or _statm[0] != os.getpid():
            _statm = (os.getpid(), os.open("/proc/self/statm", os.O_RDONLY))
        return int(os.pread(_statm[1], 128, 0).split()[1]) * _PAGE_BYTES
    except (OSError, IndexError, ValueError):  # not Linux: nothing to measure, nothing done
        return 0


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``; None on a C library without one (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


_malloc_trim = _find_malloc_trim()
