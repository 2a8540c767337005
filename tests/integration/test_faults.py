"""Storage faults on SQLite: a full disk and a read-only database answer 503 with a clear
message, store nothing half-written, and the service recovers when the fault clears.

The faults are real: a small tmpfs that fills up, and a read-only bind mount. Both need root
(CI runs as root); elsewhere these tests skip unless JOBSVC_TEST_REQUIRE_FAULTS is set.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from asgi_lifespan import LifespanManager

from jobsvc.app import create_app
from tests.conftest import make_settings, submit, wait_for_status
from tests.storage_faults import fill, mount, mounted


@contextlib.asynccontextmanager
async def service(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(make_settings(database_url), migrate_on_start=False)
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=60):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://jobsvc") as client:
            yield client


async def test_a_full_disk_answers_503_and_recovers(tmp_path: Path, sqlite_template: Path) -> None:
    with mounted("-t", "tmpfs", "-o", "size=8m", "tmpfs", target=tmp_path / "disk") as disk:
        shutil.copyfile(sqlite_template, disk / "jobsvc.db")
        async with service(f"sqlite+aiosqlite:///{disk / 'jobsvc.db'}") as client:
            first = await submit(client, "double", data=[{"a": 1}])
            assert (await wait_for_status(client, first["id"]))["status"] == "succeeded"

            filler = fill(disk)
            records = [{"text": "x" * 200, "n": i} for i in range(2000)]
            response = await client.post("/jobs", json={"task": "double", "data": records})
            assert response.status_code == 503, response.text
            assert "full" in response.json()["detail"]
            assert response.headers["retry-after"]
            listed = (await client.get("/jobs")).json()["items"]
            assert [job["id"] for job in listed] == [first["id"]]

            filler.unlink()
            response = await client.post("/jobs", json={"task": "double", "data": records[:5]})
            assert response.status_code == 202, response.text
            assert (await wait_for_status(client, response.json()["id"]))["status"] == "succeeded"
            assert len((await client.get("/jobs")).json()["items"]) == 2


async def test_an_upload_on_a_full_disk_answers_503_and_leaves_no_file(
    tmp_path: Path, sqlite_template: Path
) -> None:
    """The upload streams into the files directory beside the database: when that disk is
    full, the answer is a 503 that says so, and no part of the upload stays behind."""
    csv = b"a,b\n" + b"".join(b"%d,%d\n" % (i, i * 2) for i in range(200_000))  # 2.3 MB
    with mounted("-t", "tmpfs", "-o", "size=8m", "tmpfs", target=tmp_path / "disk") as disk:
        shutil.copyfile(sqlite_template, disk / "jobsvc.db")
        async with service(f"sqlite+aiosqlite:///{disk / 'jobsvc.db'}") as client:
            files = disk / "jobsvc.db.files"
            filler = fill(disk)
            response = await client.post(
                "/jobs?task=summarize", content=csv, headers={"Content-Type": "text/csv"}
            )
            assert response.status_code == 503, response.text
            assert "No space left" in response.json()["detail"]
            assert response.headers["retry-after"]
            assert os.listdir(files) == []
            assert (await client.get("/jobs")).json()["items"] == []

            filler.unlink()
            response = await client.post(
                "/jobs?task=summarize", content=csv, headers={"Content-Type": "text/csv"}
            )
            assert response.status_code == 202, response.text
            done = await wait_for_status(client, response.json()["id"])
            assert (done["status"], done["error"]) == ("succeeded", None)


async def test_a_read_only_database_answers_503_and_recovers(
    tmp_path: Path, sqlite_template: Path
) -> None:
    base = tmp_path / "base"
    base.mkdir()
    shutil.copyfile(sqlite_template, base / "jobsvc.db")
    with mounted("--bind", str(base), target=tmp_path / "view") as view:
        mount("-o", "remount,ro,bind", str(view))
        async with service(f"sqlite+aiosqlite:///{view / 'jobsvc.db'}") as client:
            response = await client.post("/jobs", json={"task": "double", "data": [{"a": 1}]})
            assert response.status_code == 503, response.text
            assert "cannot take writes" in response.json()["detail"]
            assert (await client.get("/healthz")).status_code == 503

            mount("-o", "remount,rw,bind", str(view))
            assert (await client.get("/healthz")).status_code == 200
            job = await submit(client, "double", data=[{"a": 1}])
            assert (await wait_for_status(client, job["id"]))["status"] == "succeeded"
            assert len((await client.get("/jobs")).json()["items"]) == 1


async def test_a_write_lock_held_past_the_busy_timeout_answers_503(
    tmp_path: Path, sqlite_template: Path
) -> None:
    """Another process holds SQLite's write lock: writes wait, then answer 503, never 500."""
    import sqlite3

    path = tmp_path / "jobsvc.db"
    shutil.copyfile(sqlite_template, path)
    app = create_app(
        make_settings(f"sqlite+aiosqlite:///{path}", sqlite_busy_timeout_ms=200),
        migrate_on_start=False,
    )
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=60):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://jobsvc") as client:
            other = sqlite3.connect(path, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")  # the write lock, held by someone else
            try:
                response = await client.post("/jobs", json={"task": "double", "data": []})
                assert response.status_code == 503, response.text
                assert "busy" in response.json()["detail"]
                assert response.headers["retry-after"]
                assert (await client.get("/healthz")).status_code == 200  # reads go on
            finally:
                other.execute("ROLLBACK")
                other.close()
            job = await submit(client, "double", data=[{"a": 1}])
            assert (await wait_for_status(client, job["id"]))["status"] == "succeeded"
            assert len((await client.get("/jobs")).json()["items"]) == 1
