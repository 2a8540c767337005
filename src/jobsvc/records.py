"""The values that cross layers: a new job, its input, an attempt's outcome.

Plain frozen dataclasses with no dependencies, so the worker processes, the service and the
repository all speak them without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class NewJob:
    task: str
    params: dict[str, Any]
    max_attempts: int
    retry_delay_seconds: float
    priority: int = 0
    timeout_seconds: float | None = None
    run_at: datetime | None = None
    owner: str = ""
    idempotency_key: str | None = None
    request_hash: str | None = None
    # Set when the caller must know the id before the job is stored (``add_task``).
    id: str | None = None


@dataclass(frozen=True)
class InputData:
    format: str  # 'json' (records), 'parquet', 'call', or a kept upload's: 'csv', 'ndjson', ..
    data: bytes | None  # None when the input is the file ``path``
    rows: int
    columns: int
    path: str | None = None
    size_bytes: int = 0  # of the file, when there is one


@dataclass(frozen=True)
class AttemptError:
    type: str
    message: str
    traceback: str | None = None
    retryable: bool = True  # False for a task's PermanentError: the job fails at once


@dataclass(frozen=True)
class ResultData:
    kind: str  # 'dataframe', 'json' or 'none'
    data: bytes | None = None  # a DataFrame as Parquet, unless it was written to ``path``
    value: dict[str, Any] | None = None
    rows: int | None = None
    path: str | None = None  # the name of an Arrow file in the files directory
