"""API keys: 401 without one, and each key sees only the jobs it submitted."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from jobsvc.app import JobQueue, create_app
from tests.conftest import make_settings, wait_for_status

KEY_A = "key-a-0123456789"
KEY_B = "key-b-9876543210"


@pytest.fixture
async def keyed_app(database_url: str) -> AsyncIterator[FastAPI]:
    app = create_app(make_settings(database_url, api_keys=[KEY_A, KEY_B]), migrate_on_start=False)
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=60):
        yield app


def client_for(app: FastAPI, key: str | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    transport = httpx.ASGITransport(app=app)
    return httpx.AsyncClient(transport=transport, base_url="http://jobsvc", headers=headers)


async def test_requests_without_a_valid_key_are_refused(keyed_app: FastAPI) -> None:
    async with client_for(keyed_app, None) as anonymous:
        for method, path in [
            ("GET", "/jobs"),
            ("POST", "/jobs"),
            ("GET", "/tasks"),
            ("GET", "/openapi.json"),
            ("GET", "/jobs/whatever/result"),
        ]:
            response = await anonymous.request(method, path)
            assert response.status_code == 401, (method, path)
            assert response.headers["www-authenticate"] == "Bearer"
        assert (await anonymous.get("/healthz")).status_code == 200
    async with client_for(keyed_app, "not-a-key") as wrong:
        response = await wrong.get("/jobs")
        assert response.status_code == 401
        assert "not valid" in response.json()["detail"]


async def test_another_keys_job_does_not_exist(keyed_app: FastAPI) -> None:
    async with client_for(keyed_app, KEY_A) as a, client_for(keyed_app, KEY_B) as b:
        response = await a.post("/jobs", json={"task": "double", "data": [{"x": 1}]})
        assert response.status_code == 202
        job_id = response.json()["id"]
        assert (await wait_for_status(a, job_id))["status"] == "succeeded"

        for method, path in [
            ("GET", f"/jobs/{job_id}"),
            ("GET", f"/jobs/{job_id}/events"),
            ("GET", f"/jobs/{job_id}/result"),
            ("POST", f"/jobs/{job_id}/cancel"),
            ("POST", f"/jobs/{job_id}/retry"),
        ]:
            assert (await b.request(method, path)).status_code == 404, (method, path)
        assert (await b.get("/jobs")).json()["items"] == []
        assert [j["id"] for j in (await a.get("/jobs")).json()["items"]] == [job_id]
        assert (await a.get(f"/jobs/{job_id}/result")).json() == [{"x": 2}]

    queue: JobQueue = keyed_app.state.queue
    assert queue.db is not None
    async with queue.db.read() as conn:
        owners = [row[0] for row in (await conn.exec_driver_sql("SELECT owner FROM jobs")).all()]
    assert len(owners) == 1
    assert owners[0]
    assert KEY_A not in owners[0]  # a fingerprint, never the key


async def test_without_keys_the_service_is_open(client: httpx.AsyncClient) -> None:
    assert (await client.get("/jobs")).status_code == 200


async def test_a_cross_site_post_cannot_change_jobs(client: httpx.AsyncClient) -> None:
    """On an open service, a page on another site must not cancel jobs through a visitor."""
    job = await client.post("/jobs", json={"task": "double", "data": [], "run_at": "2999-01-01"})
    job_id = job.json()["id"]
    forged = await client.post(f"/jobs/{job_id}/cancel", headers={"Origin": "http://evil.example"})
    assert forged.status_code == 403
    fetched = await client.post(f"/jobs/{job_id}/cancel", headers={"Sec-Fetch-Site": "cross-site"})
    assert fetched.status_code == 403
    assert (await client.get(f"/jobs/{job_id}")).json()["status"] == "queued"
    same_site = await client.post(f"/jobs/{job_id}/cancel", headers={"Origin": "http://jobsvc"})
    assert same_site.status_code == 200
