"""Logging: plain text, or one JSON object a line (``JOBSVC_LOG_FORMAT=json``).

Every line logged while a job's attempt runs carries ``job_id`` and ``attempt``: in the
service (a context variable set by the runner for that attempt's task) and in the worker
process (set around each run), including lines the task itself logs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from pythonjsonlogger.json import JsonFormatter

_current_job: ContextVar[tuple[str, int] | None] = ContextVar("jobsvc_job", default=None)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(job)s%(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s %(job_id)s %(attempt)s"


@contextmanager
def job_context(job_id: str, attempt: int) -> Iterator[None]:
    token = _current_job.set((job_id, attempt))
    try:
        yield
    finally:
        _current_job.reset(token)


class JobContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        current = _current_job.get()
        record.job_id, record.attempt = current if current else (None, None)
        record.job = f"[job {current[0]} attempt {current[1]}] " if current else ""
        return True


def configure(level: str = "info", fmt: str = "text") -> None:
    """Set up the root logger for the service or a worker process."""
    handler = logging.StreamHandler()
    handler.addFilter(JobContextFilter())
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(JSON_FIELDS, rename_fields={"levelname": "level", "name": "logger"})
        )
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
