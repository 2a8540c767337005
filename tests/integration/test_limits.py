"""Limits checked before anything is stored: cell length, compressed bodies."""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator

import httpx
import pytest
from asgi_lifespan import LifespanManager

from jobsvc.app import create_app
from tests.conftest import make_settings


@pytest.fixture
async def small(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(make_settings(database_url, max_cell_chars=100), migrate_on_start=False)
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=60):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://jobsvc") as client:
            yield client


async def no_jobs(client: httpx.AsyncClient) -> bool:
    return (await client.get("/jobs")).json()["items"] == []


async def test_a_long_cell_in_json_records_is_refused(small: httpx.AsyncClient) -> None:
    response = await small.post("/jobs", json={"task": "summarize", "data": [{"text": "x" * 101}]})
    assert response.status_code == 413
    assert "'text'" in response.json()["detail"]
    assert "100" in response.json()["detail"]
    assert await no_jobs(small)


async def test_a_long_cell_in_a_csv_is_refused(small: httpx.AsyncClient) -> None:
    body = "a,b\n1," + "y" * 500 + "\n"
    response = await small.post(
        "/jobs", params={"task": "summarize"}, content=body, headers={"content-type": "text/csv"}
    )
    assert response.status_code == 413
    # Found while the body streams: the line is over the limit before the cell is parsed.
    assert "line 2" in response.json()["detail"]
    assert "100 characters" in response.json()["detail"]
    assert await no_jobs(small)


async def test_compressed_bodies_are_refused(small: httpx.AsyncClient) -> None:
    bomb = gzip.compress(b"a\n" + b"1\n" * 1_000_000)  # small on the wire, large inflated
    response = await small.post(
        "/jobs",
        params={"task": "summarize"},
        content=bomb,
        headers={"content-type": "text/csv", "content-encoding": "gzip"},
    )
    assert response.status_code == 415
    assert "compressed" in response.json()["detail"]
    assert await no_jobs(small)


async def test_blank_ndjson_is_refused(small: httpx.AsyncClient) -> None:
    response = await small.post(
        "/jobs",
        params={"task": "summarize"},
        content=b"\n\n",
        headers={"content-type": "application/x-ndjson"},
    )
    assert response.status_code == 422
    assert "NDJSON" in response.json()["detail"]
    assert await no_jobs(small)
