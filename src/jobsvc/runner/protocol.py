"""What the service and a worker process say to each other over their socket.

Each message is framed the same way both ways: the pickle's length (``FRAME_HEADER``), then
the pickle. The service sends a ``RunRequest`` (or None: exit); the worker answers with any
number of ``("progress", value)`` and then one ``("ok", ResultData)`` or
``("error", AttemptError)``. The worker's side reads and writes blocking (these functions);
the service's side is its event loop's streams (``pool.WorkerProcess``).

An idle worker process also does the API's work (``idle_work``): a ``ConvertRequest`` is
answered with ``("ok", value)`` or ``("error", exception)``; a ``CheckRequest`` likewise, and
the process then holds the upload's table for that job's ``RunRequest``. Any other message
ends what it holds; a ``ForgetRequest`` only that (answered ``("ok", None)``).
"""

from __future__ import annotations

import pickle
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

FRAME_HEADER = struct.Struct("!Q")  # the length of the pickle that follows
SMALL_MESSAGE_BYTES = 64 * 1024  # sent with its header in one write (a copy this size is free)


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
class ConvertRequest:
    """Run ``func()`` for the API: its value, or the error it raised."""

    func: Callable[[], Any]


@dataclass(frozen=True)
class CheckRequest:
    """Parse and check a kept CSV or NDJSON upload for job ``job_id`` (``formats.Limits``),
    and hold its table for that job's run here: the reply is the ``ParsedUpload``, or the
    error that refuses the upload."""

    job_id: str
    path: str
    media_type: str
    limits: Any
    digest: bool


@dataclass(frozen=True)
class ForgetRequest:
    """Let go of a held table: its job will not run here (a replayed submit, a failed commit)."""


def frame(message: object) -> tuple[bytes, bytes]:
    """The header and the pickle of ``message``."""
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return FRAME_HEADER.pack(len(payload)), payload


def send_message(sock: socket.socket, message: object) -> None:
    header, payload = frame(message)
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
            raise EOFError("the other end closed the socket")
        view = view[received:]
    return buffer
