"""Real processes on one SQLite file: a graceful SIGTERM, and a server beside a worker."""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.live_server import LiveServer, LiveWorker


def wait_for(url: str, job_id: str, statuses: set[str], timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = httpx.get(f"{url}/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        assert time.monotonic() < deadline, f"job {job_id} stuck at {job['status']}"
        time.sleep(0.02)


@pytest.mark.slow
def test_sigterm_hands_running_jobs_back_and_a_restart_resumes_them(tmp_path: Path) -> None:
    database = tmp_path / "jobsvc.db"
    url = f"sqlite+aiosqlite:///{database}"
    gate = tmp_path / "gate"
    env = {"JOBSVC_SHUTDOWN_GRACE": "0.5"}
    with LiveServer(url, tmp_path / "a.log", **env) as server:
        job_id = httpx.post(
            f"{server.url}/jobs", json={"task": "wait_for_file", "params": {"path": str(gate)}}
        ).json()["id"]
        wait_for(server.url, job_id, {"running"})
        server.terminate()
    with sqlite3.connect(database) as conn:
        status, attempts, owner = conn.execute(
            "select status, attempts, lease_owner from jobs where id = ?", (job_id,)
        ).fetchone()
    assert (status, attempts, owner) == ("queued", 0, None)  # handed back, attempt not counted
    gate.touch()
    with LiveServer(url, tmp_path / "b.log", **env) as server:
        job = wait_for(server.url, job_id, {"succeeded", "failed"})
    assert (job["status"], job["attempts"]) == ("succeeded", 1)


@pytest.mark.slow
def test_a_server_and_a_worker_share_one_sqlite_file(tmp_path: Path) -> None:
    database = tmp_path / "jobsvc.db"
    url = f"sqlite+aiosqlite:///{database}"
    statuses: Counter[int] = Counter()
    with (
        LiveServer(url, tmp_path / "server.log") as server,
        LiveWorker(url, tmp_path / "worker.log"),
        httpx.Client(timeout=30) as http,
    ):
        ids = []
        for _ in range(200):
            response = http.post(
                f"{server.url}/jobs",
                json={"task": "nap", "params": {"seconds": 0.01, "steps": 1}, "data": []},
            )
            statuses[response.status_code] += 1
            if response.status_code == 202:
                ids.append(response.json()["id"])
        for job_id in ids:
            wait_for(server.url, job_id, {"succeeded", "failed"})
    assert statuses == {202: 200}  # never a 500 for "database is locked"
    with sqlite3.connect(database) as conn:
        runs = Counter(
            r for (r,) in conn.execute("select job_id from job_events where status = 'running'")
        )
        owners = {
            r
            for (r,) in conn.execute(
                "select distinct worker from job_events where worker is not null"
            )
        }
        done = conn.execute("select count(*) from jobs where status = 'succeeded'").fetchone()[0]
    assert done == 200
    assert set(runs.values()) == {1}  # no job ran twice
    assert len({owner.split(":")[1] for owner in owners}) == 2  # both processes did work
