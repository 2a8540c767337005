"""Concurrent submits share transactions, and each still answers only after its commit."""

from __future__ import annotations

import asyncio

import httpx

from jobsvc.app import JobQueue


async def test_concurrent_submits_are_committed_in_shared_batches(
    client: httpx.AsyncClient, app: object
) -> None:
    async def one(i: int) -> httpx.Response:
        return await client.post("/jobs", json={"task": "double", "data": [{"a": i}]})

    responses = await asyncio.gather(*(one(i) for i in range(60)))
    assert {r.status_code for r in responses} == {202}
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 60

    queue: JobQueue = app.state.queue  # type: ignore[attr-defined]
    assert queue.db is not None
    async with queue.db.read() as conn:
        rows = (await conn.exec_driver_sql("SELECT id, created_at FROM jobs")).all()
    assert {row[0] for row in rows} == ids  # every 202 is a committed row
    # One transaction stamps its jobs with one time: fewer stamps than jobs means batches.
    assert len({row[1] for row in rows}) < len(ids)
