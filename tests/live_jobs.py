"""Polling helpers for tests that drive real ``jobsvc`` processes over HTTP (not tests).

Every wait polls for a state and fails with the last thing it saw; nothing sleeps a fixed time
to let something happen.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import httpx

from tests.conftest import TERMINAL
from tests.live_server import group_members

T = TypeVar("T")


def wait_until(probe: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    """Call ``probe`` until it returns something true; return that, or fail saying ``what``."""
    deadline = time.monotonic() + timeout
    last: T = probe()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not so within {timeout:g} s (last: {last!r})")
        time.sleep(interval)
        last = probe()
    return last


def submit(http: httpx.Client, task: str, params: dict[str, Any], **options: Any) -> str:
    response = http.post(
        "/jobs", json={"task": task, "params": params, "data": [{"x": 1}], **options}
    )
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def get_job(http: httpx.Client, job_id: str) -> dict[str, Any]:
    response = http.get(f"/jobs/{job_id}")
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()
    return job


def get_events(http: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    response = http.get(f"/jobs/{job_id}/events")
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()
    return events


def peek_job(http: httpx.Client, job_id: str) -> dict[str, Any] | None:
    """The job, or None while the service answers 503 (its database briefly unavailable)."""
    response = http.get(f"/jobs/{job_id}")
    if response.status_code == 503:
        return None
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()
    return job


def wait_for_job(
    http: httpx.Client,
    job_id: str,
    done: Callable[[dict[str, Any]], bool],
    timeout: float,
    what: str,
) -> dict[str, Any]:
    """Poll the job until ``done(job)``; fail with its last state if not within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        job = peek_job(http, job_id)
        if job is not None and done(job):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id}: {what} not so within {timeout:g} s; last: {job}")
        time.sleep(0.05)


def wait_terminal(http: httpx.Client, job_id: str, timeout: float) -> dict[str, Any]:
    return wait_for_job(http, job_id, lambda j: j["status"] in TERMINAL, timeout, "terminal")


def wait_all_terminal(
    http: httpx.Client, ids: Iterable[str], timeout: float
) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    jobs: dict[str, dict[str, Any]] = {}
    pending = list(ids)
    while pending:
        for job_id in list(pending):
            job = peek_job(http, job_id)
            if job is not None and job["status"] in TERMINAL:
                jobs[job_id] = job
                pending.remove(job_id)
        if pending:
            if time.monotonic() > deadline:
                last = {job_id: peek_job(http, job_id) for job_id in pending}
                raise AssertionError(
                    f"{len(pending)} jobs never ended within {timeout:g} s: {last}"
                )
            time.sleep(0.1)
    return jobs


def wait_running_task(http: httpx.Client, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """Until the task itself runs (it reports progress 0.5 on entry), not merely claimed."""
    return wait_for_job(
        http,
        job_id,
        lambda j: j["status"] == "running" and (j["progress"] or 0) >= 0.5,
        timeout,
        "running its task",
    )


def marker_lines(path: Path, word: str) -> int:
    """How many lines of ``path`` (a ``counted_wait`` marker) start with ``word``."""
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.split(" ", 1)[0] == word)


def wait_exit(process: subprocess.Popen[bytes], timeout: float) -> float:
    """Seconds until ``process`` exited; fails (leaving it running) if it did not in time."""
    started = time.monotonic()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"pid {process.pid} still running {timeout:g} s after the signal"
        ) from None
    return time.monotonic() - started


def wait_group_empty(pgid: int, timeout: float = 5.0) -> None:
    """Every process of group ``pgid`` gone (orphans may take a moment to notice)."""
    deadline = time.monotonic() + timeout
    while left := group_members(pgid):
        if time.monotonic() > deadline:
            described = {pid: _cmdline(pid) for pid in left}
            raise AssertionError(f"left behind in group {pgid}: {described}")
        time.sleep(0.05)


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def signal_pending(pid: int, signum: signal.Signals) -> bool:
    """Whether ``signum`` is still pending for ``pid`` (sent but not yet taken by any of its
    threads): two signals of one kind sent while the first is pending merge into one."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    bit = 1 << (int(signum) - 1)
    for line in status.splitlines():
        name, _, value = line.partition(":")
        if name in {"SigPnd", "ShdPnd"} and int(value.strip(), 16) & bit:
            return True
    return False
