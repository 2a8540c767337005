"""The producer's prefetch policy: after short jobs, each slot keeps one job claimed and ready
to start the moment the slot frees. What that ready job looks like, and what happens to it when
it is cancelled, when the process before it dies, at a stop, and when it starts. Both backends,
one worker process.

Each test first occupies the worker with a job that waits for a file, queues the jobs it is
about, and then lets the first one end: the outcome's transaction claims one job to start now
and one more to keep ready, in priority order.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from jobsvc import repository as repo
from jobsvc.app import create_app
from jobsvc.db import Database
from tests.conftest import event_statuses, make_settings, submit, wait_for_status

RECORDS = [{"a": 1}, {"a": 2}]


@pytest.fixture
async def client(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    # Every job counts as short: on a slow machine the holder below could run past the
    # default threshold, and nothing would be fetched ahead.
    settings = make_settings(database_url, prefetch_below_seconds=60.0, shutdown_grace=0.2)
    app = create_app(settings, migrate_on_start=False)
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=60):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://jobsvc") as http:
            yield http


async def job(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    response = await client.get(f"/jobs/{job_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def queue_behind_holder(
    client: httpx.AsyncClient, tmp_path: Path, *jobs: tuple[str, dict[str, Any]]
) -> list[str]:
    """Hold the worker, queue ``jobs`` (task, body) in that order, then free the worker."""
    release = tmp_path / "release-holder"
    holder = await submit(client, "wait_for_file", params={"path": str(release)})
    await wait_for_status(client, holder["id"], "running")
    ids = [
        (await submit(client, task, priority=rank, **body))["id"]
        for rank, (task, body) in enumerate(jobs)
    ]
    release.touch()
    assert (await wait_for_status(client, holder["id"]))["status"] == "succeeded"
    return ids


def when(value: str | None) -> datetime:
    assert value is not None
    return datetime.fromisoformat(value)


async def test_a_ready_job_starts_when_the_one_before_it_ends(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    first, second = await queue_behind_holder(
        client,
        tmp_path,
        ("nap", {"data": RECORDS, "params": {"seconds": 0.2}}),
        ("double", {"data": RECORDS}),
    )
    done_first = await wait_for_status(client, first)
    done_second = await wait_for_status(client, second)
    assert (done_first["status"], done_second["status"]) == ("succeeded", "succeeded")
    assert (done_first["attempts"], done_second["attempts"]) == (1, 1)
    # Claimed when the holder ended, but its start time is when it began to run.
    assert when(done_second["started_at"]) >= when(done_first["finished_at"])
    assert await event_statuses(client, second) == ["queued", "running", "succeeded"]


async def test_a_ready_job_cancelled_before_its_turn_never_runs(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    release = tmp_path / "release-running"
    marker = tmp_path / "ready-job-ran"
    running, ready = await queue_behind_holder(
        client,
        tmp_path,
        ("wait_for_file", {"data": RECORDS, "params": {"path": str(release)}}),
        ("die_once", {"data": RECORDS, "params": {"marker": str(marker)}}),
    )
    await wait_for_status(client, running, "running")
    assert (await job(client, ready))["status"] == "running"  # claimed ahead, not started
    response = await client.post(f"/jobs/{ready}/cancel")
    assert response.status_code == 200, response.text
    release.touch()
    # Cancelling the ready job did not stop the process running the one before it.
    done = await wait_for_status(client, running)
    assert (done["status"], done["attempts"], done["error"]) == ("succeeded", 1, None)
    after = await submit(client, "double", data=RECORDS)
    assert (await wait_for_status(client, after["id"]))["status"] == "succeeded"
    assert not marker.exists()
    assert (await job(client, ready))["status"] == "cancelled"
    assert await event_statuses(client, ready) == ["queued", "running", "cancelled"]


async def test_a_ready_job_runs_on_the_replacement_of_a_process_that_died(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    doomed, ready = await queue_behind_holder(
        client,
        tmp_path,
        ("die", {"data": RECORDS, "max_attempts": 1}),
        ("double", {"data": RECORDS}),
    )
    lost = await wait_for_status(client, doomed)
    assert (lost["status"], lost["error"]["type"]) == ("failed", "WorkerLost")
    done = await wait_for_status(client, ready)
    assert (done["status"], done["attempts"], done["error"]) == ("succeeded", 1, None)
    assert await event_statuses(client, ready) == ["queued", "running", "succeeded"]


async def test_a_stop_hands_a_ready_job_back_uncounted(database_url: str, tmp_path: Path) -> None:
    settings = make_settings(database_url, prefetch_below_seconds=60.0, shutdown_grace=0.2)
    app = create_app(settings, migrate_on_start=False)
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=60):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://jobsvc") as client:
            running, ready = await queue_behind_holder(
                client,
                tmp_path,
                ("wait_for_file", {"data": RECORDS, "params": {"path": str(tmp_path / "no")}}),
                ("double", {"data": RECORDS}),
            )
            await wait_for_status(client, running, "running")
            assert (await job(client, ready))["status"] == "running"
    db = Database(settings)
    try:
        async with db.read() as conn:
            rows = {job_id: await repo.get_job(conn, job_id) for job_id in (running, ready)}
    finally:
        await db.dispose()
    for row in rows.values():
        assert (row.status, row.attempts, row.lease_owner, row.error_type) == (
            "queued",
            0,
            None,
            None,
        )
