"""Every setting of the service, read from the environment with the prefix ``JOBSVC_``.

A ``Settings`` object is made by whoever starts the service (the CLI, a test, a user's app)
and passed down; nothing reads the environment at import time.
"""

from __future__ import annotations

import os
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def default_worker_count() -> int:
    """The number of cores less one (the API keeps a core), at least one."""
    return max(1, (os.cpu_count() or 1) - 1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="JOBSVC_", extra="ignore")

    database_url: str = "sqlite+aiosqlite:///./jobsvc.db"
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Finished jobs (with their inputs, results and events) are deleted after this many days.
    retention_days: float = Field(default=7.0, gt=0)
    # Comma-separated import paths, imported by the API and by every worker process.
    task_modules: Annotated[list[str], NoDecode] = Field(default_factory=list)
    workers: int = Field(default_factory=default_worker_count, ge=1)
    # The largest request body of any kind, JSON included.
    max_upload_bytes: int = Field(default=512 * 1024 * 1024, ge=1)
    max_rows: int = Field(default=50_000_000, ge=1)
    max_columns: int = Field(default=10_000, ge=1)
    max_cell_chars: int = Field(default=1_000_000, ge=1)
    # The longest a client may take to send a request's headers, and the longest it may pause
    # while sending a body; past it the connection is closed (after a 408 for a body), so a
    # slow or stalled client holds no connection, task or upload file for long.
    request_idle_seconds: float = Field(default=30.0, gt=0)
    # When set (comma-separated), every request but GET /healthz needs one of these keys.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, repr=False)
    lease_seconds: float = Field(default=30.0, gt=0)
    # A worker process's address-space cap; a runaway job then fails its attempt with a
    # MemoryError (or is killed) instead of taking the machine. None: no cap.
    worker_memory_mb: int | None = Field(default=None, ge=64)
    # How much a converter process (the API's parsing of uploads and large JSON bodies, and
    # its rendering of results) may grow by (RLIMIT_AS, beyond what it maps at start): a
    # conversion that needs more is refused with 413 instead of growing the process until
    # the machine runs out. None: no cap.
    converter_memory_mb: int | None = Field(default=4096, ge=64)
    shutdown_grace: float = Field(default=10.0, ge=0)
    # While a queue's jobs run shorter than this, each slot keeps one more job claimed and
    # ready to start the moment the slot frees (the producer's prefetch); 0 turns it off.
    prefetch_below_seconds: float = Field(default=1.0, ge=0)
    # How often an idle producer looks for due jobs without a wake-up (other processes' jobs).
    poll_seconds: float = Field(default=1.0, gt=0)
    # FULL survives a power cut with every acknowledged job; NORMAL is faster and survives a
    # crash of the process but may lose the last transactions on power loss.
    sqlite_synchronous: Literal["FULL", "NORMAL"] = "FULL"
    # How long a request waits for the database before it answers 503: on SQLite for the
    # write lock, counted from when the write was asked for (its wait behind this process's
    # other writes included); on PostgreSQL for a free connection of the pool.
    sqlite_busy_timeout_ms: int = Field(default=5_000, ge=0)
    # Where uploaded tables are kept as files. Default: beside a SQLite database file
    # ("<database>.files"); on PostgreSQL, inside the database unless this names a directory
    # that every instance shares.
    files_dir: str | None = None
    default_max_attempts: int = Field(default=3, ge=1)
    retry_base_seconds: float = Field(default=1.0, ge=0)
    retry_max_seconds: float = Field(default=600.0, ge=0)

    @field_validator("task_modules", "api_keys", mode="before")
    @classmethod
    def _split_modules(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")
