"""The job's states and the decision for an attempt's outcome: pure, no database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from jobsvc import retry
from jobsvc.lifecycle import (
    ACTIVE,
    CANCELLABLE,
    RETRYABLE,
    TERMINAL,
    TRANSITIONS,
    WAITING,
    AttemptError,
    Decision,
    JobStatus,
    Outcome,
    ResultData,
    Verdict,
    can_move,
    decide,
    lost_worker_error,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
FAILED_ONCE = Outcome(error=AttemptError("ValueError", "bad"))


def decision(outcome: Outcome, attempt: int = 1, max_attempts: int = 3) -> Decision:
    return decide(outcome, attempt=attempt, max_attempts=max_attempts, backoff=2.0, now=NOW)


def test_every_state_has_its_transitions_and_terminal_ones_lead_only_to_a_retry() -> None:
    assert set(TRANSITIONS) == set(JobStatus)
    assert TRANSITIONS[JobStatus.SUCCEEDED] == frozenset()
    for status in TERMINAL - {JobStatus.SUCCEEDED}:
        assert TRANSITIONS[status] == {JobStatus.QUEUED}
    assert WAITING | {JobStatus.RUNNING} == ACTIVE
    assert not ACTIVE & TERMINAL
    assert CANCELLABLE == ACTIVE
    assert TERMINAL - {JobStatus.SUCCEEDED} == RETRYABLE


@pytest.mark.parametrize(
    ("source", "target", "allowed"),
    [
        ("queued", "running", True),
        ("retrying", "running", True),
        ("running", "queued", True),  # handed back, or rescued
        ("running", "succeeded", True),
        ("queued", "succeeded", False),
        ("succeeded", "queued", False),
        ("failed", "queued", True),
        ("cancelled", "running", False),
    ],
)
def test_can_move(source: str, target: str, allowed: bool) -> None:
    assert can_move(source, target) is allowed


def test_a_result_succeeds_whatever_the_attempt() -> None:
    outcome = Outcome(result=ResultData("none"))
    for attempt in (1, 3, 9):
        assert decision(outcome, attempt).verdict is Verdict.SUCCEED


def test_an_error_with_attempts_left_retries_after_the_backoff() -> None:
    made = decide(FAILED_ONCE, attempt=1, max_attempts=3, backoff=2.0, now=NOW)
    assert (made.verdict, made.status) == (Verdict.RETRY, JobStatus.RETRYING)
    assert made.retry_at == NOW + timedelta(seconds=2)


def test_an_error_on_the_last_attempt_fails() -> None:
    made = decide(FAILED_ONCE, attempt=3, max_attempts=3, backoff=2.0, now=NOW)
    assert (made.verdict, made.status, made.retry_at) == (Verdict.FAIL, JobStatus.FAILED, None)


def test_a_permanent_error_fails_at_once() -> None:
    permanent = Outcome(error=AttemptError("MissingColumnError", "no", retryable=False))
    made = decide(permanent, attempt=1, max_attempts=3, backoff=2.0, now=NOW)
    assert made.verdict is Verdict.FAIL


@pytest.mark.parametrize(
    "outcome",
    [
        Outcome(interrupted=True),
        Outcome(error=AttemptError("WorkerLost", "killed"), interrupted=True),
        Outcome(result=ResultData("none"), interrupted=True),
    ],
)
def test_an_interrupted_attempt_is_handed_back_even_on_its_last_attempt(outcome: Outcome) -> None:
    made = decide(outcome, attempt=1, max_attempts=1, backoff=2.0, now=NOW)
    assert (made.verdict, made.status) == (Verdict.HAND_BACK, JobStatus.QUEUED)


def test_every_decision_is_an_allowed_move_from_running() -> None:
    outcomes = [
        Outcome(result=ResultData("none")),
        FAILED_ONCE,
        Outcome(error=AttemptError("X", "y", retryable=False)),
        Outcome(interrupted=True),
    ]
    for outcome in outcomes:
        for attempt in (1, 3):
            made = decide(outcome, attempt=attempt, max_attempts=3, backoff=1.0, now=NOW)
            assert can_move(JobStatus.RUNNING, made.status)


def test_a_lost_worker_says_whether_attempts_remain() -> None:
    assert "queued again" in lost_worker_error(1, 3, "host:1:abc").message
    last = lost_worker_error(3, 3, "host:1:abc")
    assert (last.type, "no attempts remain" in last.message) == ("WorkerLost", True)


@pytest.mark.parametrize(
    ("attempt", "jitter", "expected"),
    [(1, 0.0, 0.5), (1, 1.0, 1.0), (2, 0.0, 1.0), (3, 0.5, 3.0), (30, 0.0, 300.0)],
)
def test_backoff_doubles_with_jitter_up_to_the_cap(
    attempt: int, jitter: float, expected: float
) -> None:
    assert retry.backoff_seconds(1.0, attempt, 600.0, jitter) == pytest.approx(expected)


def test_backoff_draws_its_own_jitter_within_half_and_all_of_the_delay() -> None:
    delays = {retry.backoff_seconds(4.0, 1, 600.0) for _ in range(200)}
    assert min(delays) >= 2.0
    assert max(delays) <= 4.0
    assert len(delays) > 1
