"""The contract's crash guarantees, on a real server killed with SIGKILL and started again."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import TERMINAL
from tests.live_server import LiveServer, group_members

pytestmark = pytest.mark.slow

JOBS = 40
NAP_SECONDS = 0.3


def submit(http: httpx.Client, task: str, params: dict[str, Any], **options: Any) -> str:
    response = http.post(
        "/jobs", json={"task": task, "params": params, "data": [{"x": 1}], **options}
    )
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def poll(http: httpx.Client, path: str, done: Any, timeout: float, what: str) -> Any:
    """GET ``path`` until ``done(body)``; fail after ``timeout`` seconds saying ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        body = http.get(path).json()
        if done(body):
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:g} s; last seen: {body}")
        time.sleep(0.05)


def poll_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not so within {timeout:g} s"
        time.sleep(0.02)


def all_terminal(http: httpx.Client, ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    jobs: dict[str, dict[str, Any]] = {}
    pending = list(ids)
    while pending:
        for job_id in list(pending):
            job = http.get(f"/jobs/{job_id}").json()
            if job["status"] in TERMINAL:
                jobs[job_id] = job
                pending.remove(job_id)
        if pending and time.monotonic() > deadline:
            raise AssertionError(f"{len(pending)} jobs never ended, e.g. {pending[:3]}")
        time.sleep(0.1)
    return jobs


def parse_sqlite_time(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_kill_9_loses_no_job_and_records_each_result_once(tmp_path: Path) -> None:
    path = tmp_path / "jobsvc.db"
    url = f"sqlite+aiosqlite:///{path}"
    first = LiveServer(url, tmp_path / "first.log").start()
    try:
        with httpx.Client(base_url=first.url, timeout=10) as http:
            ids = [submit(http, "nap", {"seconds": NAP_SECONDS, "steps": 6}) for _ in range(JOBS)]
            # Kill while an attempt is well under way, not in its last moments, so it is
            # certainly cut off rather than finishing between this look and the kill.
            poll(
                http,
                "/jobs?status=running",
                lambda page: any((j["progress"] or 0) < 0.6 for j in page["items"]),
                timeout=30,
                what="no job was running",
            )
            first.kill9()
    finally:
        first.kill9()

    with sqlite3.connect(path) as db:
        cut_off = [row[0] for row in db.execute("SELECT id FROM jobs WHERE status = 'running'")]
    assert cut_off, "the kill found no running job"

    restarted_at = datetime.now(UTC)
    started = time.monotonic()
    with LiveServer(url, tmp_path / "second.log") as second:
        ready_after = time.monotonic() - started
        with httpx.Client(base_url=second.url, timeout=10) as http:
            jobs = all_terminal(http, ids, timeout=90)

    assert {job["status"] for job in jobs.values()} == {"succeeded"}
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        results = dict(db.execute("SELECT job_id, count(*) FROM job_results GROUP BY job_id"))
        succeeded_events = dict(
            db.execute(
                "SELECT job_id, count(*) FROM job_events WHERE status = 'succeeded' GROUP BY job_id"
            )
        )
        over = db.execute("SELECT id FROM jobs WHERE attempts > max_attempts").fetchall()
        lost = {
            row[0]
            for row in db.execute(
                "SELECT job_id FROM job_events WHERE status = 'queued' "
                "AND error_type = 'WorkerLost'"
            )
        }
        running_at = [
            (job_id, parse_sqlite_time(at))
            for job_id, at in db.execute(
                "SELECT job_id, at FROM job_events WHERE status = 'running'"
            )
        ]
    assert results == dict.fromkeys(ids, 1)
    assert succeeded_events == dict.fromkeys(ids, 1)
    assert over == []
    assert set(cut_off) <= lost
    after_restart = [(job_id, at) for job_id, at in running_at if at > restarted_at]
    first_resumed = min(at for _, at in after_restart) - restarted_at
    cut_off_resumed = min(at for job_id, at in after_restart if job_id in cut_off) - restarted_at
    print(
        f"\nafter the restart: the API answered in {ready_after:.2f} s; the first job started "
        f"in {first_resumed.total_seconds():.2f} s, the cut-off job again in "
        f"{cut_off_resumed.total_seconds():.2f} s"
    )


def test_a_job_that_kills_its_worker_fails_and_the_service_keeps_serving(
    tmp_path: Path,
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'jobsvc.db'}"
    with (
        LiveServer(url, tmp_path / "server.log") as server,
        httpx.Client(base_url=server.url, timeout=10) as http,
    ):
        doomed = submit(http, "die", {}, max_attempts=2)
        fine = submit(http, "double", {})

        jobs = all_terminal(http, [doomed, fine], timeout=60)
        events = http.get(f"/jobs/{doomed}/events").json()
        health = http.get("/healthz")

    assert jobs[doomed]["status"] == "failed"
    assert jobs[doomed]["attempts"] == 2
    assert jobs[doomed]["error"]["type"] == "WorkerLost"
    assert [e["status"] for e in events].count("running") == 2
    assert jobs[fine]["status"] == "succeeded"
    assert health.status_code == 200


def _forked_by_the_fork_server(pid: int) -> bool:
    """A worker (or converter) process: the fork server's child, not the server itself."""
    parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return b"multiprocessing.forkserver" in Path(f"/proc/{parent}/cmdline").read_bytes()


def test_worker_processes_killed_while_idle_are_replaced_and_cost_no_job_an_attempt(
    tmp_path: Path,
) -> None:
    """The out-of-memory killer may pick an idle worker: the next jobs must not pay for it
    with an attempt, and the dispatcher must keep all its workers, however often it happens."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'jobsvc.db'}"
    with (
        LiveServer(url, tmp_path / "server.log", JOBSVC_WORKERS="2") as server,
        httpx.Client(base_url=server.url, timeout=10) as http,
    ):
        assert server.process is not None
        group = server.process.pid
        for _ in range(3):
            members = group_members(group)
            workers = {pid for pid in members if _forked_by_the_fork_server(pid)}
            assert len(workers) == 2, members
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
            poll_until(lambda gone=workers: not gone & set(group_members(group)))
            ids = [submit(http, "double", {}) for _ in range(4)]
            jobs = all_terminal(http, ids, timeout=60)
            assert {(job["status"], job["attempts"]) for job in jobs.values()} == {("succeeded", 1)}
