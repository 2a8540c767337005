"""The runner's batched writes, and the completer's retries, on a real database."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from jobsvc.app import create_app
from jobsvc.db import Database
from jobsvc.errors import DatabaseBusy
from jobsvc.runner.faults import FaultHooks
from jobsvc.runner.writes import WriteBatch
from tests.conftest import make_settings, submit, wait_for_status


async def test_writes_submitted_together_share_one_transaction(db: Database) -> None:
    batch = WriteBatch(db)
    seen: list[Any] = []

    async def write(conn: AsyncConnection) -> int:
        seen.append(conn)
        return len(seen)

    first, second = batch.submit(write), batch.submit(write)
    assert (await first, await second) == (1, 2)
    assert seen[0] is seen[1]
    await batch.submit(write)  # a write on its own starts its own transaction
    assert seen[2] is not seen[0]
    await batch.close()


async def test_a_write_that_fails_in_a_shared_transaction_fails_alone(db: Database) -> None:
    batch = WriteBatch(db)

    async def good(conn: AsyncConnection) -> str:
        await conn.execute(text("SELECT 1"))
        return "ok"

    async def bad(conn: AsyncConnection) -> str:
        raise ValueError("this write is broken")

    results = await asyncio.gather(
        batch.submit(good), batch.submit(bad), batch.submit(good), return_exceptions=True
    )
    assert results[0] == "ok"
    assert isinstance(results[1], ValueError)
    assert results[2] == "ok"
    await batch.close()


async def test_a_database_that_cannot_take_the_outcome_keeps_it_until_it_can(
    database_url: str,
) -> None:
    # The first writes of the outcome meet a busy database: the completer keeps the outcome,
    # retries, and the task does not run again.
    refusals = {"left": 4}

    def busy_for_a_while(_job_id: str) -> None:
        if refusals["left"]:
            refusals["left"] -= 1
            raise DatabaseBusy()

    settings = make_settings(database_url)
    faults = FaultHooks(before_record=busy_for_a_while)
    app = create_app(settings, migrate_on_start=False, faults=faults)
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=60):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://jobsvc") as client:
            job = await submit(client, "double", data=[{"a": 1}], max_attempts=1)
            done = await wait_for_status(client, job["id"], timeout=20)
            assert (done["status"], done["attempts"], done["error"]) == ("succeeded", 1, None)
            assert refusals["left"] == 0
            statuses = [e["status"] for e in (await client.get(f"/jobs/{job['id']}/events")).json()]
            assert statuses == ["queued", "running", "succeeded"]


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_a_succeeded_job_carries_no_error_of_an_earlier_attempt(
    client: httpx.AsyncClient, tmp_path: Any
) -> None:
    job = await submit(
        client, "fail_times", params={"counter": str(tmp_path / "count"), "failures": 1}
    )
    done = await wait_for_status(client, job["id"], timeout=20)
    assert (done["status"], done["attempts"], done["error"]) == ("succeeded", 2, None)
    events = (await client.get(f"/jobs/{job['id']}/events")).json()
    assert [e["error"]["type"] for e in events if e["error"]] == ["RuntimeError"]
