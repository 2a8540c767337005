"""Concurrent submits share transactions, and each still answers only after its commit."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from sqlalchemy import insert, select

from jobsvc import repository as repo
from jobsvc.app import JobQueue
from jobsvc.db import Database
from jobsvc.models import job_inputs, jobs


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


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_rows_bound_as_tuples_are_stored_as_sqlalchemy_stores_them(db: Database) -> None:
    """On SQLite ``insert_rows`` converts the values itself: each must be stored exactly as
    SQLAlchemy's own insert stores it (the claim compares times as text, say)."""
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)  # no microseconds: the text has them all
    elsewhere = datetime(2026, 1, 2, 5, 4, 5, 123, tzinfo=timezone(timedelta(hours=2)))
    shared_params: dict[str, Any] = {"n": 1, "nested": {"x": [1, 2]}}

    def job(job_id: str, run_at: datetime, params: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": job_id,
            "owner": "",
            "task": "double",
            "status": "queued",
            "priority": 0,
            "params": params,
            "attempts": 0,
            "max_attempts": 3,
            "timeout_seconds": None if run_at is now else 2.5,
            "retry_delay_seconds": 1.0,
            "run_at": run_at,
            "created_at": now,
            "updated_at": now,
            "idempotency_key": None,
            "request_hash": None,
        }

    def rows(prefix: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        jobs_ = [
            job(f"{prefix}1", now, shared_params),
            job(f"{prefix}2", elsewhere, shared_params),
            job(f"{prefix}3", now, {"other": "é"}),
        ]
        inputs = [
            {"job_id": f"{prefix}1", "format": "json", "data": b"[1]", "path": None,
             "rows": 1, "columns": 1, "size_bytes": 3},
            {"job_id": f"{prefix}2", "format": "csv", "data": None, "path": "x.csv",
             "rows": 10, "columns": 2, "size_bytes": 99},
        ]  # fmt: skip
        return jobs_, inputs

    ours_jobs, ours_inputs = rows("a")
    theirs_jobs, theirs_inputs = rows("b")
    async with db.write() as conn:
        await repo.insert_rows(conn, jobs, ours_jobs)
        await repo.insert_rows(conn, job_inputs, ours_inputs)
        await conn.execute(insert(jobs), theirs_jobs)
        await conn.execute(insert(job_inputs), theirs_inputs)
    async with db.read() as conn:
        stored = (await conn.exec_driver_sql("SELECT * FROM jobs ORDER BY id")).all()
        stored_inputs = (
            await conn.exec_driver_sql("SELECT *, typeof(data) FROM job_inputs ORDER BY job_id")
        ).all()
        due = (
            (await conn.execute(select(jobs.c.id).where(jobs.c.run_at <= now).order_by("id")))
            .scalars()
            .all()
        )
    assert [row[1:] for row in stored[:3]] == [row[1:] for row in stored[3:]]
    assert [row[1:] for row in stored_inputs[:2]] == [row[1:] for row in stored_inputs[2:]]
    assert stored[0][10] == "2026-01-02 03:04:05.000000"
    assert stored_inputs[0][-1] == "blob"
    assert due == ["a1", "a3", "b1", "b3"]  # 05:04 at +02:00 is 03:04: due by text as well
