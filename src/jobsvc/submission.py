"""A job as it is submitted, before it is stored: what to run, and its input data.

Plain frozen dataclasses with no dependencies, made by the service and stored by the
repository.
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
