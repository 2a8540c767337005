"""The job's life: its states, the transitions allowed between them, and the decision for an
attempt's outcome. Pure: no I/O, no clock, no database; ``docs/state_machine.md`` draws it.

    queued ──claim──▶ running ──result──▶ succeeded
       ▲                │  │ ──error, attempts left──▶ retrying ──due──▶ (claimed: running)
       │                │  └──error, none left / permanent──▶ failed
       └──handed back───┘        (a stop, or a job claimed for a slot that went)
    queued | retrying | running ──cancel──▶ cancelled
    failed | cancelled ──retry──▶ queued

The runner reports what happened to an attempt (an ``Outcome``); ``decide`` says what the job
becomes. The completer writes that decision, fenced on the attempt's lease.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


# Waiting to be claimed: a producer may take these once their run_at has come.
WAITING = frozenset({JobStatus.QUEUED, JobStatus.RETRYING})
ACTIVE = WAITING | {JobStatus.RUNNING}
TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
CANCELLABLE = ACTIVE
RETRYABLE = frozenset({JobStatus.FAILED, JobStatus.CANCELLED})

TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED}),
    JobStatus.RETRYING: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED}),
    JobStatus.RUNNING: frozenset(
        {
            JobStatus.SUCCEEDED,
            JobStatus.RETRYING,
            JobStatus.FAILED,
            JobStatus.CANCELLED,
            JobStatus.QUEUED,  # handed back uncounted, or rescued after a lost worker
        }
    ),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset({JobStatus.QUEUED}),
    JobStatus.CANCELLED: frozenset({JobStatus.QUEUED}),
}


def can_move(source: str, target: str) -> bool:
    """May a job in ``source`` enter ``target``?"""
    return JobStatus(target) in TRANSITIONS[JobStatus(source)]


# --- what happened to an attempt ----------------------------------------------------------------


@dataclass(frozen=True)
class AttemptError:
    """Why an attempt did not succeed, as the job's record and its events show it."""

    type: str
    message: str
    traceback: str | None = None
    retryable: bool = True  # False for a task's PermanentError: the job fails at once


@dataclass(frozen=True)
class ResultData:
    """What a succeeded attempt produced, encoded for storage."""

    kind: str  # 'dataframe', 'json' or 'none'
    data: bytes | None = None  # a DataFrame as Parquet, unless it was written to ``path``
    value: dict[str, Any] | None = None
    rows: int | None = None
    path: str | None = None  # the name of an Arrow file in the files directory


LOST = "WorkerLost"
"""The error type of an attempt whose worker process (or whole service) went away."""


@dataclass(frozen=True)
class Outcome:
    """The end of one attempt, as the executor saw it.

    ``result`` or ``error`` is set; ``interrupted`` says the attempt was cut off by this
    service's own stop (or the job was claimed for a slot that went) rather than by the task.
    """

    result: ResultData | None = None
    error: AttemptError | None = None
    interrupted: bool = False

    @property
    def succeeded(self) -> bool:
        return self.result is not None


# --- the decision ----------------------------------------------------------------------------


class Verdict(enum.StrEnum):
    SUCCEED = "succeed"
    RETRY = "retry"
    FAIL = "fail"
    HAND_BACK = "hand_back"  # back to the queue, the attempt uncounted, no error recorded


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    status: JobStatus  # the state the job enters
    retry_at: datetime | None = None  # for RETRY: when it may run again


def decide(
    outcome: Outcome,
    *,
    attempt: int,
    max_attempts: int,
    backoff: float,
    now: datetime,
) -> Decision:
    """What the job becomes after ``outcome`` of attempt number ``attempt``; a retry waits
    ``backoff`` seconds (``retry.backoff_seconds``)."""
    if outcome.interrupted:
        return Decision(Verdict.HAND_BACK, JobStatus.QUEUED)
    if outcome.result is not None:
        return Decision(Verdict.SUCCEED, JobStatus.SUCCEEDED)
    error = outcome.error
    if error is not None and error.retryable and attempt < max_attempts:
        return Decision(Verdict.RETRY, JobStatus.RETRYING, now + timedelta(seconds=backoff))
    return Decision(Verdict.FAIL, JobStatus.FAILED)


def lost_worker_error(attempt: int, max_attempts: int, owner: str) -> AttemptError:
    """The error of an attempt cut off with its worker (a crash, a kill, a lost lease)."""
    exhausted = attempt >= max_attempts
    return AttemptError(
        LOST,
        f"attempt {attempt} of {max_attempts} was cut off: its worker ({owner}) stopped "
        "without finishing it (crash, kill or lost lease)"
        + ("; no attempts remain" if exhausted else "; the job was queued again"),
    )
