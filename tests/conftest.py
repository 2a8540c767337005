"""Fixtures: a fresh, migrated database per test (SQLite file or PostgreSQL database), the
app with its lifespan running, and an HTTP client.

The behaviour tests run on both backends. PostgreSQL is found at JOBSVC_TEST_POSTGRES_URL
(default postgresql://postgres@127.0.0.1:5432/postgres); when it does not answer the PostgreSQL
cases are skipped with a note, unless JOBSVC_TEST_REQUIRE_POSTGRES is set (CI), where they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Collection, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from jobsvc import migrate
from jobsvc.app import create_app
from jobsvc.db import Database
from jobsvc.settings import Settings

PG_ADMIN_URL = os.environ.get(
    "JOBSVC_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REQUIRE_PG = bool(os.environ.get("JOBSVC_TEST_REQUIRE_POSTGRES"))
TERMINAL = {"succeeded", "failed", "cancelled"}
TEST_TASKS = "tests.sample_tasks"


def _asyncpg_url(database: str) -> str:
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    return f"{base.replace('postgresql://', 'postgresql+asyncpg://', 1)}/{database}"


async def _pg_admin(*statements: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def pg_admin(*statements: str) -> None:
    asyncio.run(_pg_admin(*statements))


def _postgres_available() -> str | None:
    """None when PostgreSQL answers, else why not."""
    try:
        pg_admin("SELECT 1")
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite database, copied for each test (cheaper than migrating each time)."""
    path = tmp_path_factory.mktemp("template") / "template.db"
    settings = Settings(database_url=f"sqlite+aiosqlite:///{path}")
    migrate.upgrade(settings)
    # Fold the WAL into the main file so one copy carries everything.
    import sqlite3

    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    problem = _postgres_available()
    if problem is not None:
        message = f"PostgreSQL not reachable at {PG_ADMIN_URL} ({problem})"
        if REQUIRE_PG:
            pytest.fail(message + "; JOBSVC_TEST_REQUIRE_POSTGRES is set", pytrace=False)
        pytest.skip(message + ": PostgreSQL tests skipped")
    name = f"jobsvc_tpl_{os.getpid()}"
    pg_admin(f'DROP DATABASE IF EXISTS "{name}"', f'CREATE DATABASE "{name}"')
    migrate.upgrade(Settings(database_url=_asyncpg_url(name)))
    yield name
    pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def database_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    if backend == "sqlite":
        template = request.getfixturevalue("sqlite_template")
        path = tmp_path / "jobsvc.db"
        shutil.copyfile(template, path)
        yield f"sqlite+aiosqlite:///{path}"
        return
    with fresh_pg_database(request.getfixturevalue("pg_template")) as url:
        yield url


@contextlib.contextmanager
def fresh_pg_database(template: str) -> Iterator[str]:
    name = f"jobsvc_t_{uuid.uuid4().hex[:12]}"
    pg_admin(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    try:
        yield _asyncpg_url(name)
    finally:
        pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_database_url(pg_template: str) -> Iterator[str]:
    """A fresh PostgreSQL database, for the tests that are about PostgreSQL itself."""
    with fresh_pg_database(pg_template) as url:
        yield url


def pg_cluster() -> list[str]:
    """``pg_ctlcluster`` arguments naming the local cluster; skips (or fails, when PostgreSQL
    is required) where there is none to restart."""
    versions = sorted(Path("/etc/postgresql").glob("*/main"))
    local = urlsplit(PG_ADMIN_URL).hostname in {"127.0.0.1", "localhost", "::1"}
    if not versions or shutil.which("pg_ctlcluster") is None or not local:
        reason = (
            f"no local PostgreSQL cluster to restart (pg_ctlcluster, /etc/postgresql/*/main, "
            f"the tests' server at {PG_ADMIN_URL} on this machine)"
        )
        if REQUIRE_PG:
            pytest.fail(reason + "; JOBSVC_TEST_REQUIRE_POSTGRES is set", pytrace=False)
        pytest.skip(reason)
    version = versions[-1].parent.name
    return ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main"]


def pg_ctl(cluster: list[str], action: str) -> None:
    subprocess.run([*cluster, action], check=True, capture_output=True, text=True, timeout=120)


def pg_running(cluster: list[str]) -> bool:
    status = subprocess.run([*cluster, "status"], capture_output=True, text=True, timeout=60)
    return status.returncode == 0


@pytest.fixture
def cluster() -> Iterator[list[str]]:
    """The local PostgreSQL cluster, for tests that stop or restart it: running again after
    the test whatever happened in it. (Ask for it after the database fixture: its teardown
    then runs first, before the database is dropped.)"""
    names = pg_cluster()
    try:
        yield names
    finally:
        if not pg_running(names):
            pg_ctl(names, "start")


def make_settings(database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "task_modules": [TEST_TASKS],
        "workers": 1,
        "poll_seconds": 0.2,
        "retry_base_seconds": 0.01,
        "shutdown_grace": 2.0,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    """The database alone, for tests that put the job table into a state directly."""
    database = Database(make_settings(database_url))
    yield database
    await database.dispose()


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    application = create_app(settings, migrate_on_start=False)
    async with LifespanManager(application, startup_timeout=60, shutdown_timeout=60):
        yield application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://jobsvc") as http:
        yield http


async def events_of(client: httpx.AsyncClient, job_id: str) -> list[dict[str, Any]]:
    response = await client.get(f"/jobs/{job_id}/events")
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()
    return events


async def event_statuses(client: httpx.AsyncClient, job_id: str) -> list[str]:
    """The statuses a job has entered, in order."""
    return [event["status"] for event in await events_of(client, job_id)]


async def wait_for_status(
    client: httpx.AsyncClient,
    job_id: str,
    statuses: Collection[str] | str = frozenset(TERMINAL),
    timeout: float = 30.0,  # noqa: ASYNC109 - a deadline for polling, not for one call
) -> dict[str, Any]:
    """Poll the job until it is in one of ``statuses``; fail with its last state if not."""
    wanted = {statuses} if isinstance(statuses, str) else set(statuses)
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = await client.get(f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        job = response.json()
        if job["status"] in wanted:
            return job
        await asyncio.sleep(0.02)
    raise AssertionError(f"job {job_id} never reached {wanted}; last seen: {job}")


async def submit(client: httpx.AsyncClient, task: str, **body: Any) -> dict[str, Any]:
    response = await client.post("/jobs", json={"task": task, **body})
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    return job
