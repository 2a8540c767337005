"""jobsvc inside a user's own FastAPI app: JobQueue, its router, DurableBackgroundTasks."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI, HTTPException

from jobsvc import DurableBackgroundTasks, JobQueue
from jobsvc.settings import Settings
from tests import sample_calls
from tests.conftest import make_settings, wait_for_status


def build_app(settings: Settings) -> tuple[FastAPI, JobQueue]:
    jobs = JobQueue(settings)
    app = FastAPI(lifespan=jobs.lifespan)
    app.include_router(jobs.router, prefix="/jobs")

    @app.post("/process/")
    def process_endpoint(
        data: list[dict[str, Any]], out: str, background_tasks: DurableBackgroundTasks
    ) -> dict[str, Any]:
        job = background_tasks.add_task(sample_calls.process_data, data, out=out)
        return {"message": "Data is being processed", "job_id": job.id, "url": job.url}

    @app.post("/total/")
    async def total_endpoint(
        data: list[dict[str, Any]], background_tasks: DurableBackgroundTasks
    ) -> dict[str, Any]:
        frame = pd.DataFrame(data)
        job = background_tasks.add_task(sample_calls.total, frame, column="v")
        return {"job_id": job.id}

    @app.post("/fails-after-queueing/")
    def failing_endpoint(background_tasks: DurableBackgroundTasks) -> None:
        background_tasks.add_task(sample_calls.process_data, [], out="unused")
        raise HTTPException(400, "the endpoint changed its mind")

    @app.post("/lambda/")
    def lambda_endpoint(background_tasks: DurableBackgroundTasks) -> dict[str, str]:
        try:
            background_tasks.add_task(lambda: None)
        except TypeError as error:
            return {"refused": str(error)}
        return {"refused": ""}

    return app, jobs


@pytest.fixture
async def embedded(database_url: str) -> AsyncIterator[tuple[httpx.AsyncClient, JobQueue]]:
    # The template database is already migrated; JobQueue would migrate an empty one itself.
    app, jobs = build_app(make_settings(database_url))
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=60):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            yield client, jobs


async def test_add_task_stores_a_job_that_runs(
    embedded: tuple[httpx.AsyncClient, JobQueue], tmp_path: Path
) -> None:
    client, _ = embedded
    out = tmp_path / "described.json"
    response = await client.post("/process/", params={"out": str(out)}, json=[{"a": 1}, {"a": 3}])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["url"] == f"/jobs/{body['job_id']}"
    job = await wait_for_status(client, body["job_id"])
    assert job["status"] == "succeeded", job
    assert job["task"] == "tests.sample_calls:process_data"
    assert json.loads(out.read_text())["a"]["mean"] == 2.0


async def test_dataframe_arguments_and_results(
    embedded: tuple[httpx.AsyncClient, JobQueue],
) -> None:
    client, _ = embedded
    response = await client.post("/total/", json=[{"v": 1.5}, {"v": 2.5}])
    job = await wait_for_status(client, response.json()["job_id"])
    assert job["status"] == "succeeded", job
    assert (await client.get(f"/jobs/{job['id']}/result")).json() == {"total": 4.0}


async def test_an_endpoint_that_raises_stores_nothing(
    embedded: tuple[httpx.AsyncClient, JobQueue],
) -> None:
    client, _ = embedded
    response = await client.post("/fails-after-queueing/")
    assert response.status_code == 400
    assert (await client.get("/jobs")).json()["items"] == []


async def test_unstorable_arguments_are_refused_at_add_task(
    embedded: tuple[httpx.AsyncClient, JobQueue], tmp_path: Path
) -> None:
    client, jobs = embedded
    refused = (await client.post("/lambda/")).json()["refused"]
    assert "lambda" in refused

    def closure() -> None: ...

    with pytest.raises(TypeError, match="closure"):
        jobs.service.prepare_call(closure, (), {})
    with (tmp_path / "f.txt").open("w") as handle, pytest.raises(TypeError, match="TextIOWrapper"):
        jobs.service.prepare_call(sample_calls.process_data, (handle,), {"out": "x"})
    with pytest.raises(TypeError, match="argument 'out'"):
        jobs.service.prepare_call(sample_calls.process_data, ([],), {"out": io.BytesIO()})
    assert (await client.get("/jobs")).json()["items"] == []


async def test_two_queues_in_one_process_do_not_share_jobs(
    embedded: tuple[httpx.AsyncClient, JobQueue], tmp_path: Path, sqlite_template: Path
) -> None:
    client, _ = embedded
    other_db = tmp_path / "other.db"
    other_db.write_bytes(sqlite_template.read_bytes())
    other_app, _ = build_app(make_settings(f"sqlite+aiosqlite:///{other_db}"))
    async with LifespanManager(other_app, startup_timeout=60, shutdown_timeout=60):
        transport = httpx.ASGITransport(app=other_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://other") as other:
            response = await other.post("/total/", json=[{"v": 1}])
            job_id = response.json()["job_id"]
            assert (await wait_for_status(other, job_id))["status"] == "succeeded"
            assert (await client.get(f"/jobs/{job_id}")).status_code == 404


async def test_enqueue_in_the_users_own_transaction(
    embedded: tuple[httpx.AsyncClient, JobQueue], database_url: str, tmp_path: Path
) -> None:
    """A job enqueued in the app's own session commits or rolls back with the app's rows."""
    from sqlalchemy import Column, Integer, MetaData, String, Table, func, select
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    client, jobs = embedded
    metadata = MetaData()
    orders = Table(
        "app_orders", metadata, Column("id", Integer, primary_key=True), Column("ref", String)
    )
    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)

        async with AsyncSession(engine) as session, session.begin():
            await session.execute(orders.insert().values(ref="kept"))
            kept = await jobs.enqueue_in(
                session, sample_calls.process_data, [{"a": 1}], out=str(tmp_path / "kept.json")
            )

        rolled_back = None
        async with AsyncSession(engine) as session:
            await session.execute(orders.insert().values(ref="dropped"))
            rolled_back = await jobs.enqueue_in(
                session, sample_calls.process_data, [{"a": 2}], out=str(tmp_path / "no.json")
            )
            await session.rollback()

        assert (await wait_for_status(client, kept))["status"] == "succeeded"
        assert (await client.get(f"/jobs/{rolled_back}")).status_code == 404
        async with engine.connect() as conn:
            refs = (await conn.execute(select(orders.c.ref))).scalars().all()
            assert refs == ["kept"]
            assert (await conn.execute(select(func.count()).select_from(orders))).scalar() == 1
    finally:
        await engine.dispose()
