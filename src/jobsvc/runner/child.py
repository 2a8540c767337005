"""The body of a worker process: receive a job, run its task, send back the outcome.

Runs in a child process, so pandas never competes with the event loop for the interpreter.
It does no database work: everything it learns goes back over its socket (``protocol``), and
the service writes it. A process that dies mid-job (segfault, out of memory, ``kill -9``) is
noticed by the service as end-of-file on the socket.

It never acts on SIGINT or SIGTERM (``processes``): a stop is the main process's to handle.
A task that raises ``KeyboardInterrupt`` or ``SystemExit`` ends this process: that is not an
error of the task's data, and the attempt ends as if the process had been killed.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import time
import traceback
from typing import Any

import pandas as pd

from jobsvc import formats, logs, processes
from jobsvc.lifecycle import AttemptError, ResultData
from jobsvc.runner.protocol import (
    CheckRequest,
    ConvertRequest,
    ForgetRequest,
    RunRequest,
    receive_message,
    send_message,
)
from jobsvc.tasks import progress, registry
from jobsvc.tasks.registry import PermanentError, import_task_modules, resolve_function

_PROGRESS_INTERVAL = 0.2
# The exit status of a worker whose task raised SystemExit or KeyboardInterrupt.
EXIT_TASK_ENDED_PROCESS = 3


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
    # The parsed copy, if any, is removed by the service once the attempt ends: unlinking a
    # large file takes the kernel milliseconds, which the job would wait for here.
    frame = formats.load_input(
        request.input_format, request.input_data, request.input_path, request.input_cache
    )
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
    api_memory_mb: int | None = None,
) -> None:
    """``memory_mb``: this process's own cap; ``api_memory_mb``: how much it may grow while it
    does the API's work (the converter processes' cap, ``JOBSVC_CONVERTER_MEMORY_MB``)."""
    processes.ignore_stop_signals()
    os.environ["RUST_BACKTRACE"] = "0"  # see processes.start_child
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
        resident = processes.resident_bytes()
        # One table at a time: whatever this process is asked next ends the one it holds.
        kept, held = held, None
        if not isinstance(request, RunRequest):
            del kept
            with processes.growth_capped(api_memory_mb):
                held = _answer_for_the_api(sock, request, resident)
            continue
        table = None
        if kept is not None and kept[0] == request.job_id:
            table, resident = kept[1], kept[2]
        del kept
        try:
            with logs.job_context(request.job_id, request.attempt):
                outcome = run(request, table)
            send_message(sock, ("ok", outcome))
        except (KeyboardInterrupt, SystemExit) as error:
            logging.getLogger("jobsvc.worker").error(
                "job %s: the task raised %s; its worker process ends",
                request.job_id,
                type(error).__name__,
            )
            os._exit(EXIT_TASK_ENDED_PROCESS)
        except Exception as error:  # MemoryError under the cap is the task's failure too
            failure = AttemptError(
                type(error).__name__,
                str(error),
                traceback.format_exc(),
                retryable=not isinstance(error, PermanentError),
            )
            send_message(sock, ("error", failure))
        table = None
        processes.release_memory_above(resident)


def _answer_for_the_api(
    sock: socket.socket, request: object, resident: int
) -> tuple[str, pd.DataFrame, int] | None:
    """Answer a check, a conversion or a forget; what to hold for a job, if anything."""
    if isinstance(request, ForgetRequest):
        processes.release_memory_above(0)  # the table was the growth: hand it back
        send_message(sock, ("ok", None))
        return None
    try:
        if isinstance(request, CheckRequest):
            parsed, frame = formats.read_kept_upload(
                request.path, request.media_type, request.limits, digest=request.digest
            )
            send_message(sock, ("ok", parsed))
            return request.job_id, frame, resident
        assert isinstance(request, ConvertRequest)
        value = processes.call_and_release(request.func)
    except Exception as error:  # a refusal (malformed data, say) is the API's answer
        error.__traceback__ = None  # its frames may hold what ran out of memory
        send_message(sock, ("error", error))
        return None
    send_message(sock, ("ok", value))
    return None
