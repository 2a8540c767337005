"""What the HTTP API takes and gives, as pydantic models (requests forbid unknown fields)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from jobsvc.lifecycle import JobStatus


def _as_utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    # An ISO time without an offset is read as UTC, the service's only time zone.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class SubmitOptions(BaseModel):
    """The options a submit may carry besides its data (JSON fields, or query parameters)."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1, max_length=200, description="The name of a registered task.")
    params: dict[str, Any] = Field(default_factory=dict, description="The task's params.")
    priority: int = Field(default=0, ge=-1_000_000, le=1_000_000, description="Lower runs first.")
    max_attempts: int | None = Field(default=None, ge=1, le=100)
    retry_delay: float | None = Field(
        default=None, ge=0, le=86_400, description="Seconds before the first retry (doubling)."
    )
    run_at: datetime | None = Field(default=None, description="Not before this time (ISO 8601).")

    _utc = field_validator("run_at")(_as_utc)


class SubmitJSON(SubmitOptions):
    data: list[dict[str, Any]] = Field(
        default_factory=list, description="The input data: a list of records."
    )


class ErrorInfo(BaseModel):
    type: str
    message: str
    traceback: str | None = None

    @classmethod
    def of(cls, row: Any) -> ErrorInfo | None:
        """The error columns of a job or event row (None when it has no error)."""
        if row.error_type is None:
            return None
        return cls(
            type=row.error_type, message=row.error_message or "", traceback=row.error_traceback
        )


class JobOut(BaseModel):
    id: str
    task: str
    status: JobStatus
    attempts: int
    max_attempts: int
    priority: int
    params: dict[str, Any]
    created_at: datetime
    run_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: float | None
    error: ErrorInfo | None
    result_url: str | None
    events_url: str

    @classmethod
    def from_row(cls, row: Any, url: str) -> JobOut:
        return cls(
            id=row.id,
            task=row.task,
            status=row.status,
            attempts=row.attempts,
            max_attempts=row.max_attempts,
            priority=row.priority,
            params=row.params,
            created_at=row.created_at,
            run_at=row.run_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
            progress=row.progress,
            error=ErrorInfo.of(row),
            result_url=f"{url}/result" if row.status == JobStatus.SUCCEEDED else None,
            events_url=f"{url}/events",
        )


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None


class EventOut(BaseModel):
    at: datetime
    status: JobStatus
    attempt: int
    worker: str | None
    error: ErrorInfo | None

    @classmethod
    def from_row(cls, row: Any) -> EventOut:
        return cls(
            at=row.at,
            status=row.status,
            attempt=row.attempt,
            worker=row.worker,
            error=ErrorInfo.of(row),
        )


class TaskOut(BaseModel):
    name: str
    description: str
    max_attempts: int | None
    timeout: float | None
    params_schema: dict[str, Any]


class Health(BaseModel):
    status: str
    database: str


class Problem(BaseModel):
    detail: Any
