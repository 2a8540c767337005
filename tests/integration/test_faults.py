"""Storage faults on SQLite: a full disk, a read-only database and another process's write
lock answer 503 with Retry-After and a clear message, within the busy timeout, store nothing
half-written, and the service recovers when the fault clears; /healthz says so meanwhile.

The faults are real: a small tmpfs that fills up, a read-only bind mount (both need root: CI
runs as root; elsewhere these tests skip unless JOBSVC_TEST_REQUIRE_FAULTS is set), and a
process that holds the write lock. On PostgreSQL: the service's connections killed under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from asgi_lifespan import LifespanManager

from jobsvc.app import create_app
from tests.conftest import PG_ADMIN_URL, make_settings, submit, wait_for_status
from tests.storage_faults import checkpoint_truncate, fill, mount, mounted, write_lock_held


@contextlib.asynccontextmanager
async def service(database_url: str, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(make_settings(database_url, **settings), migrate_on_start=False)
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


async def test_an_upload_that_fits_is_not_refused_for_want_of_room_for_its_parsed_copy(
    tmp_path: Path, sqlite_template: Path
) -> None:
    """With the worker busy, a converter process checks the upload and would leave its parsed
    table beside it as a copy: on a disk with room for the upload but not for that copy too,
    the upload is accepted all the same, and the worker parses it when the job runs."""
    csv = b"a,b\n" + b"".join(b"%d,%d\n" % (i, i * 2) for i in range(200_000))  # 2.3 MB
    release = tmp_path / "release"
    with mounted("-t", "tmpfs", "-o", "size=16m", "tmpfs", target=tmp_path / "disk") as disk:
        shutil.copyfile(sqlite_template, disk / "jobsvc.db")
        async with service(f"sqlite+aiosqlite:///{disk / 'jobsvc.db'}") as client:
            holder = await submit(client, "wait_for_file", params={"path": str(release)})
            await wait_for_status(client, holder["id"], "running")
            filler = fill(disk)
            # Room for the upload (2.3 MB) and the rows, not for its copy as well (3.2 MB).
            os.truncate(filler, filler.stat().st_size - 4 * 2**20)
            response = await client.post(
                "/jobs?task=summarize", content=csv, headers={"Content-Type": "text/csv"}
            )
            assert response.status_code == 202, response.text
            files = os.listdir(disk / "jobsvc.db.files")
            assert files == [f"{response.json()['id']}.csv"]  # the upload, no copy
            release.touch()
            done = await wait_for_status(client, response.json()["id"])
            assert (done["status"], done["error"]) == ("succeeded", None)
            result = (await client.get(f"/jobs/{done['id']}/result")).json()
            assert result["rows"] == 200_000


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


async def test_healthz_is_503_while_writes_fail_on_a_full_disk_and_200_once_one_succeeds(
    tmp_path: Path, sqlite_template: Path
) -> None:
    with mounted("-t", "tmpfs", "-o", "size=8m", "tmpfs", target=tmp_path / "disk") as disk:
        path = disk / "jobsvc.db"
        shutil.copyfile(sqlite_template, path)
        async with service(f"sqlite+aiosqlite:///{path}") as client:
            assert (await client.get("/healthz")).status_code == 200
            checkpoint_truncate(path)  # so that even a small write needs space
            filler = fill(disk)
            try:
                response = await client.post("/jobs", json={"task": "double", "data": []})
                assert response.status_code == 503, response.text
                # Reads go on, but the service cannot take jobs: not healthy.
                assert (await client.get("/jobs")).status_code == 200
                health = await client.get("/healthz")
                assert health.status_code == 503, health.text
                assert health.headers["retry-after"]
                assert "full" in health.json()["database"]
            finally:
                filler.unlink()
            # Nothing else writes here: the health check's own write finds the space again.
            assert (await client.get("/healthz")).json() == {"status": "ok", "database": "ok"}
            await submit(client, "double", data=[{"a": 1}])


BUSY_MS = 500


async def test_writes_queued_behind_another_process_lock_all_answer_503_within_the_busy_timeout(
    tmp_path: Path, sqlite_template: Path
) -> None:
    """20 writes arrive at once while another process holds SQLite's write lock: plain submits
    (one group commit), submits with an Idempotency-Key (a transaction each), a cancel and a
    retry. Each answers 503 within about one busy timeout, not one per write queued ahead."""
    path = tmp_path / "jobsvc.db"
    shutil.copyfile(sqlite_template, path)
    async with service(f"sqlite+aiosqlite:///{path}", sqlite_busy_timeout_ms=BUSY_MS) as client:
        done = await submit(client, "double", data=[{"a": 1}])
        await wait_for_status(client, done["id"])

        async def timed(method: str, url: str, **kwargs: Any) -> tuple[httpx.Response, float]:
            started = time.monotonic()
            response = await client.request(method, url, **kwargs)
            return response, time.monotonic() - started

        body = {"task": "double", "data": [{"a": 1}]}
        requests = [
            *(timed("POST", "/jobs", json=body) for _ in range(10)),
            *(
                timed("POST", "/jobs", json=body, headers={"Idempotency-Key": f"key-{i}"})
                for i in range(8)
            ),
            timed("POST", f"/jobs/{done['id']}/cancel"),
            timed("POST", f"/jobs/{done['id']}/retry"),
        ]
        with write_lock_held(path):
            answers = await asyncio.gather(*requests)
        for response, _ in answers:
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"]
            assert "busy" in response.json()["detail"]
        waits = sorted(round(seconds, 2) for _, seconds in answers)
        assert waits[-1] < 3 * BUSY_MS / 1000, f"answered after {waits} s"

        job = await submit(client, "double", data=[{"a": 2}])
        assert (await wait_for_status(client, job["id"]))["status"] == "succeeded"
        assert len((await client.get("/jobs")).json()["items"]) == 2


async def test_killed_postgresql_connections_answer_503_never_500_and_recover(
    pg_database_url: str,
) -> None:
    """Every connection the service holds is killed under it (what a failover or a reaper of
    idle connections does): each request answers as usual or 503 with Retry-After."""
    async with service(pg_database_url) as client:
        done = await submit(client, "double", data=[{"a": 1}])
        await wait_for_status(client, done["id"])

        admin = await asyncpg.connect(PG_ADMIN_URL)
        try:
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = $1 AND pid <> pg_backend_pid()",
                pg_database_url.rsplit("/", 1)[1],
            )
        finally:
            await admin.close()
        assert killed > 0

        expected = {
            "GET /jobs/{id}": 200,
            "GET /jobs": 200,
            "GET /jobs/{id}/events": 200,
            "POST /jobs": 202,
            "POST /jobs/{id}/cancel": 409,
            "GET /healthz": 200,
        }
        requests = []
        for what in expected:
            method, path = what.split(" ")
            body = {"task": "double", "data": []} if method == "POST" and path == "/jobs" else None
            requests.append(client.request(method, path.format(id=done["id"]), json=body))
        answers = await asyncio.gather(*requests)
        for (what, status), response in zip(expected.items(), answers, strict=True):
            assert response.status_code in (status, 503), (what, response.text)
            if response.status_code == 503:
                assert response.headers["retry-after"], what

        assert (await client.get("/healthz")).status_code == 200
        job = await submit(client, "double", data=[{"a": 2}])
        assert (await wait_for_status(client, job["id"]))["status"] == "succeeded"
