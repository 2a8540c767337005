"""Several instances on one PostgreSQL job table: wake-ups by NOTIFY, each job run once,
work spread over the instances, and the jobs of a killed instance taken over by the others.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from jobsvc.app import JobQueue
from tests.conftest import make_settings, submit, wait_for_status
from tests.live_server import LiveServer, LiveWorker

LEASE_SECONDS = 3


def plain_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def query(url: str, sql: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(plain_dsn(url))
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def test_a_submit_on_one_instance_wakes_another_at_once(pg_database_url: str) -> None:
    """The API-only instance has no workers; the other never polls (300 s), so only the
    NOTIFY sent with the submit can start the job."""
    api_only = JobQueue(make_settings(pg_database_url), migrate_on_start=False, run_workers=False)
    workers = JobQueue(make_settings(pg_database_url, poll_seconds=300), migrate_on_start=False)
    app = FastAPI(lifespan=api_only.lifespan)
    app.include_router(api_only.router, prefix="/jobs")
    async with workers.lifespan(), LifespanManager(app, startup_timeout=60):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            # Let the listener connect first: a job submitted before would wait for a poll.
            await asyncio.sleep(0.5)
            job = await submit(client, "double", data=[{"a": 1}])
            done = await wait_for_status(client, job["id"], timeout=10)
    assert done["status"] == "succeeded"


def submit_many(urls: list[str], count: int, **body: Any) -> list[str]:
    ids = []
    with httpx.Client(timeout=30) as http:
        for i in range(count):
            response = http.post(f"{urls[i % len(urls)]}/jobs", json=body)
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
    return ids


def wait_all_terminal(url: str, ids: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = set(ids)
    with httpx.Client(timeout=10) as http:
        while pending and time.monotonic() < deadline:
            for job_id in list(pending):
                status = http.get(f"{url}/jobs/{job_id}").json()["status"]
                if status in {"succeeded", "failed", "cancelled"}:
                    pending.discard(job_id)
            if pending:
                time.sleep(0.1)
    assert not pending, f"{len(pending)} jobs never finished"


@pytest.mark.slow
def test_two_servers_and_a_worker_share_the_work_and_survive_a_kill(
    pg_database_url: str, tmp_path: Path
) -> None:
    env = {"JOBSVC_LEASE_SECONDS": str(LEASE_SECONDS)}
    with (
        LiveServer(pg_database_url, tmp_path / "a.log", **env) as server_a,
        LiveServer(pg_database_url, tmp_path / "b.log", **env) as server_b,
        LiveWorker(pg_database_url, tmp_path / "w.log", **env),
    ):
        urls = [server_a.url, server_b.url]
        ids = submit_many(urls, 300, task="nap", params={"seconds": 0.01, "steps": 1}, data=[])
        wait_all_terminal(server_b.url, ids, timeout=180)

        runs = asyncio.run(
            query(
                pg_database_url,
                "SELECT job_id, worker FROM job_events WHERE status = 'running'",
            )
        )
        per_job = Counter(row["job_id"] for row in runs)
        assert set(per_job) == set(ids)
        assert set(per_job.values()) == {1}, "a job ran more than once"
        results = asyncio.run(query(pg_database_url, "SELECT count(*) AS n FROM job_results"))
        assert results[0]["n"] == len(ids)
        per_instance = Counter(row["worker"].split(":")[1] for row in runs)
        assert len(per_instance) == 3, f"work did not spread: {per_instance}"

        # Now kill one server while jobs it claimed are running.
        long_ids = submit_many(urls, 6, task="nap", params={"seconds": 2.0, "steps": 4}, data=[])
        deadline = time.monotonic() + 30
        owned: list[Any] = []
        while not owned and time.monotonic() < deadline:
            owned = asyncio.run(
                query(
                    pg_database_url,
                    "SELECT id FROM jobs WHERE status = 'running' AND lease_owner LIKE $1",
                    f"%:{server_a.pid}:%",
                )
            )
            time.sleep(0.02)
        assert owned, "server A never ran one of the long jobs"
        server_a.kill9()
        killed_at = time.monotonic()
        wait_all_terminal(server_b.url, long_ids, timeout=60)
        taken_over_after = time.monotonic() - killed_at

        statuses = asyncio.run(
            query(pg_database_url, "SELECT id, status FROM jobs WHERE id = ANY($1)", long_ids)
        )
        assert {row["status"] for row in statuses} == {"succeeded"}
        lost = asyncio.run(
            query(
                pg_database_url,
                "SELECT job_id FROM job_events WHERE error_type = 'WorkerLost'",
            )
        )
        assert {row["job_id"] for row in lost} >= {row["id"] for row in owned}
        print(f"\njobs of the killed instance finished {taken_over_after:.1f} s after the kill")
