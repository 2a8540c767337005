"""Leases, the sweep, fencing, poison jobs and graceful stops, on both backends.

The sweep and fencing tests put the job table into each state directly (as a crashed or
paused worker would leave it) and check what the repository and the runner make of it.
"""

from __future__ import annotations

import os
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
from asgi_lifespan import LifespanManager
from sqlalchemy import func, select, update

from jobsvc import repository as repo
from jobsvc.app import create_app
from jobsvc.db import Database
from jobsvc.lifecycle import ResultData
from jobsvc.models import job_events, job_results, jobs
from jobsvc.runner.faults import FaultHooks
from jobsvc.runner.runner import Runner
from jobsvc.submission import NewJob
from tests.conftest import make_settings, submit, wait_for_status

DEAD_HOST_OWNER = "elsewhere:1:deadbeef"  # another machine: only lease expiry can tell


async def new_job(db: Database, max_attempts: int = 3) -> str:
    async with db.write() as conn:
        row = await repo.insert_job(
            conn,
            NewJob(task="double", params={}, max_attempts=max_attempts, retry_delay_seconds=0),
            None,
            repo.utcnow(),
        )
    return str(row.id)


async def claim(db: Database, worker: str, lease: float = 30.0) -> Any:
    now = repo.utcnow()
    async with db.write() as conn:
        claimed = await repo.claim(conn, worker, now, now + timedelta(seconds=lease))
    return claimed[0] if claimed else None


async def job_row(db: Database, job_id: str) -> Any:
    async with db.read() as conn:
        return await repo.get_job(conn, job_id)


async def events(db: Database, job_id: str) -> list[Any]:
    async with db.read() as conn:
        return list(await repo.list_events(conn, job_id))


async def expire_lease(db: Database, job_id: str) -> None:
    async with db.write() as conn:
        past = repo.utcnow() - timedelta(seconds=1)
        await conn.execute(update(jobs).where(jobs.c.id == job_id).values(lease_expires_at=past))


async def sweep(db: Database, dead_owners: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    async with db.write() as conn:
        return await repo.reclaim_lost(conn, repo.utcnow(), dead_owners)


async def test_expired_lease_goes_back_to_the_queue_with_the_attempt_counted(db: Database) -> None:
    job_id = await new_job(db)
    await claim(db, DEAD_HOST_OWNER)
    await expire_lease(db, job_id)
    assert await sweep(db) == [(job_id, "queued")]
    row = await job_row(db, job_id)
    assert (row.status, row.attempts, row.lease_owner) == ("queued", 1, None)
    assert row.error_type == "WorkerLost"
    last = (await events(db, job_id))[-1]
    assert (last.status, last.attempt, last.error_type) == ("queued", 1, "WorkerLost")


async def test_a_live_lease_is_left_alone(db: Database) -> None:
    job_id = await new_job(db)
    await claim(db, DEAD_HOST_OWNER)
    assert await sweep(db) == []
    assert (await job_row(db, job_id)).status == "running"


async def test_a_known_dead_owner_loses_its_jobs_before_the_lease_expires(db: Database) -> None:
    job_id = await new_job(db)
    await claim(db, "thishost:999999:cafebabe")
    assert await sweep(db, ("thishost:999999:cafebabe",)) == [(job_id, "queued")]


async def test_used_up_attempts_end_failed_with_worker_lost(db: Database) -> None:
    job_id = await new_job(db, max_attempts=1)
    await claim(db, DEAD_HOST_OWNER)
    await expire_lease(db, job_id)
    assert await sweep(db) == [(job_id, "failed")]
    row = await job_row(db, job_id)
    assert (row.status, row.error_type) == ("failed", "WorkerLost")
    assert "no attempts remain" in row.error_message
    assert row.finished_at is not None


async def test_cancelled_and_finished_jobs_are_not_swept(db: Database) -> None:
    cancelled = await new_job(db)
    await claim(db, DEAD_HOST_OWNER)
    async with db.write() as conn:
        await repo.transition(
            conn,
            cancelled,
            owner=None,
            allowed_from={"running"},
            status="cancelled",
            now=repo.utcnow(),
            values={"lease_expires_at": repo.utcnow() - timedelta(seconds=5)},
        )
    finished = await new_job(db)
    row = await claim(db, "w:1:a")
    async with db.write() as conn:
        assert await repo.finish_succeeded(
            conn, finished, "w:1:a", row.attempts, ResultData("none"), repo.utcnow()
        )
    assert await sweep(db, ("w:1:a",)) == []
    assert (await job_row(db, cancelled)).status == "cancelled"
    assert (await job_row(db, finished)).status == "succeeded"


async def test_a_worker_presumed_dead_cannot_overwrite_the_new_attempt(db: Database) -> None:
    job_id = await new_job(db)
    first = await claim(db, "paused:1:aaaa")
    await expire_lease(db, job_id)
    await sweep(db)
    second = await claim(db, "fresh:2:bbbb")
    assert (first.attempts, second.attempts) == (1, 2)
    now = repo.utcnow()
    late = ResultData("json", value={"from": "the late worker"})
    async with db.write() as conn:
        assert not await repo.renew_leases(conn, "paused:1:aaaa", [(job_id, 1)], now)
        assert not await repo.save_progress(conn, job_id, "paused:1:aaaa", 1, 0.9, now)
        assert not await repo.finish_succeeded(conn, job_id, "paused:1:aaaa", 1, late, now)
        assert not await repo.finish_failed_attempt(
            conn, job_id, "paused:1:aaaa", 1, repo.AttemptError("X", "late"), now, None
        )
    current = ResultData("json", value={"from": "the current worker"})
    async with db.write() as conn:
        assert await repo.finish_succeeded(conn, job_id, "fresh:2:bbbb", 2, current, now)
    # The late worker tries again after the job is done: still nothing.
    async with db.write() as conn:
        assert not await repo.finish_succeeded(conn, job_id, "paused:1:aaaa", 1, late, now)
    async with db.read() as conn:
        stored = await repo.get_result(conn, job_id)
        results = (await conn.execute(select(func.count()).select_from(job_results))).scalar_one()
        succeeded = (
            await conn.execute(
                select(func.count())
                .select_from(job_events)
                .where(job_events.c.job_id == job_id, job_events.c.status == "succeeded")
            )
        ).scalar_one()
    assert stored is not None
    assert (stored.value, stored.attempt, results, succeeded) == (current.value, 2, 1, 1)


async def test_a_second_claim_finds_nothing_while_the_job_runs(db: Database) -> None:
    await new_job(db)
    assert await claim(db, "a:1:x") is not None
    assert await claim(db, "b:2:y") is None


async def test_start_up_recovers_jobs_of_a_previous_run_in_this_process(
    database_url: str,
) -> None:
    """A restart in the same process (same pid) must not wait for the old lease to expire."""
    settings = make_settings(database_url, lease_seconds=3600)
    db = Database(settings)
    try:
        job_id = await new_job(db)
        old = Runner(settings, db)
        await claim(db, old.runner_id)  # as if `old` had claimed it, then vanished
        new = Runner(settings, db)
        changed = await new.rescuer.run_once()
        assert changed == [(job_id, "queued")]
    finally:
        await db.dispose()


async def test_a_memory_hog_fails_its_attempt_and_the_service_goes_on(database_url: str) -> None:
    settings = make_settings(database_url, worker_memory_mb=1024)
    app = create_app(settings, migrate_on_start=False)
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=60):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://jobsvc") as client:
            hog = await submit(client, "hog", params={"megabytes": 4096}, max_attempts=1)
            failed = await wait_for_status(client, hog["id"])
            assert failed["status"] == "failed"
            assert failed["error"]["type"] in {"MemoryError", "WorkerLost"}
            fine = await submit(client, "double", data=[{"a": 1}])
            assert (await wait_for_status(client, fine["id"]))["status"] == "succeeded"


async def test_a_graceful_stop_hands_running_jobs_back_uncounted(
    database_url: str, tmp_path: Path
) -> None:
    settings = make_settings(database_url, shutdown_grace=0.1)
    release = tmp_path / "release"
    app = create_app(settings, migrate_on_start=False)
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=60):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://jobsvc") as client:
            job = await submit(client, "wait_for_file", params={"path": str(release)})
            await wait_for_status(client, job["id"], "running")
    # The lifespan has ended: the job is back in the queue, its attempt not used up.
    db = Database(settings)
    try:
        row = await job_row(db, job["id"])
        assert (row.status, row.attempts, row.lease_owner) == ("queued", 0, None)
        assert [e.status for e in await events(db, job["id"])] == ["queued", "running", "queued"]
    finally:
        await db.dispose()
    release.touch()
    app = create_app(settings, migrate_on_start=False)
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=60):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://jobsvc") as client:
            done = await wait_for_status(client, job["id"])
            assert (done["status"], done["attempts"]) == ("succeeded", 1)


async def test_a_fault_in_the_runner_itself_fails_the_attempt_not_the_job(
    database_url: str,
) -> None:
    # Not a task's failure but the runner's own (a bug, say) while it prepares an attempt:
    # the attempt ends as a RunnerError and is retried like any failure; the job does not stay
    # `running` with a lease renewed for ever.
    def broken_for_the_first_attempt(job_id: str) -> None:
        if job_id not in broken:
            broken.add(job_id)
            raise RuntimeError("the runner broke")

    broken: set[str] = set()
    settings = make_settings(database_url)
    faults = FaultHooks(before_request=broken_for_the_first_attempt)
    app = create_app(settings, migrate_on_start=False, faults=faults)
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=60):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://jobsvc") as client:
            job = await submit(client, "double", data=[{"a": 1}])
            done = await wait_for_status(client, job["id"], timeout=20)
            assert (done["status"], done["attempts"], done["error"]) == ("succeeded", 2, None)
            history = await client.get(f"/jobs/{job['id']}/events")
            errors = [e["error"]["type"] for e in history.json() if e["error"]]
            assert errors == ["RunnerError"]
            follow = await submit(client, "double", data=[{"a": 21}])
            assert (await wait_for_status(client, follow["id"]))["status"] == "succeeded"
            result = await client.get(f"/jobs/{follow['id']}/result")
            assert result.json() == [{"a": 42}]


async def test_cancelling_a_running_job_stops_its_process(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    job = await submit(client, "wait_for_file", params={"path": str(tmp_path / "never")})
    await wait_for_status(client, job["id"], "running")
    assert (await client.post(f"/jobs/{job['id']}/cancel")).status_code == 200
    # The single worker is free again at once, though the cancelled task never returns.
    follow = await submit(client, "double", data=[{"a": 2}])
    assert (await wait_for_status(client, follow["id"], timeout=10))["status"] == "succeeded"
    assert (await client.get(f"/jobs/{job['id']}")).json()["status"] == "cancelled"


def test_runner_ids_are_unique_per_start() -> None:
    ids = {repo.new_runner_id("host") for _ in range(100)}
    assert len(ids) == 100
    assert all(i.startswith(f"host:{os.getpid()}:") for i in ids)


async def test_retry_timer_wakes_the_runner(database_url: str, tmp_path: Path) -> None:
    """A retry after its backoff starts without waiting for the next poll (here: never)."""
    settings = make_settings(database_url, poll_seconds=300)
    app = create_app(settings, migrate_on_start=False)
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=60):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://jobsvc") as client:
            job = await submit(
                client,
                "fail_times",
                params={"counter": str(tmp_path / "count"), "failures": 2},
                retry_delay=0.05,
            )
            done = await wait_for_status(client, job["id"], timeout=20)
            assert (done["status"], done["attempts"]) == ("succeeded", 3)


def test_job_ids_are_uuid7_in_creation_order() -> None:
    ids = [repo.new_job_id() for _ in range(5000)]  # many share a millisecond
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert {uuid.UUID(i).version for i in ids} == {7}


async def test_one_claim_takes_several_jobs_in_priority_order(db: Database) -> None:
    ids = []
    for priority in (5, 1, 3, 0, 9):
        async with db.write() as conn:
            row = await repo.insert_job(
                conn,
                NewJob(
                    task="double",
                    params={},
                    max_attempts=1,
                    retry_delay_seconds=0,
                    priority=priority,
                ),
                None,
                repo.utcnow(),
            )
        ids.append((priority, row.id))
    now = repo.utcnow()
    async with db.write() as conn:
        first = await repo.claim(conn, "a:1:x", now, now + timedelta(seconds=30), limit=3)
    async with db.write() as conn:
        second = await repo.claim(conn, "b:2:y", now, now + timedelta(seconds=30), limit=3)
    by_priority = [job_id for _, job_id in sorted(ids)]
    assert [row.id for row in first] == by_priority[:3]
    assert [row.id for row in second] == by_priority[3:]
    assert {row.attempts for row in first + second} == {1}
