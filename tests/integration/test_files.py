"""Uploaded tables and large results kept as files beside the database (SQLite), or in it
(PostgreSQL)."""

from __future__ import annotations

import io
import json
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pyarrow as pa
import pytest
from sqlalchemy import Table, select, update

from jobsvc import formats, retention
from jobsvc.db import Database
from jobsvc.files import ORPHAN_AGE_SECONDS, FileStore, boot_tag
from jobsvc.models import job_inputs, job_results, jobs
from jobsvc.settings import Settings
from tests.conftest import make_settings, submit, wait_for_status

CSV_BODY = b"city,temp\nOslo,3.5\nLima,19.0\nOslo,4.5\n"
STEPS = [{"op": "group_by", "by": ["city"], "aggregations": {"temp": ["mean"]}}]


async def upload(
    client: httpx.AsyncClient,
    body: bytes = CSV_BODY,
    steps: list[dict[str, Any]] = STEPS,
    **headers: str,
) -> httpx.Response:
    """A CSV body submitted to the ``pipeline`` task."""
    return await client.post(
        "/jobs",
        params={"task": "pipeline", "params": json.dumps({"steps": steps})},
        content=body,
        headers={"Content-Type": "text/csv", **headers},
    )


async def stored_row(settings: Settings, table: Table, job_id: str) -> Any:
    """The job's row in ``job_inputs`` or ``job_results``."""
    db = Database(settings)
    try:
        async with db.read() as conn:
            return (await conn.execute(select(table).where(table.c.job_id == job_id))).one()
    finally:
        await db.dispose()


def stored_files(settings: Settings) -> list[str]:
    store = FileStore.for_settings(settings)
    if store is None or not store.root.is_dir():
        return []
    return sorted(os.listdir(store.root))


async def test_an_upload_is_a_file_on_sqlite_and_a_row_on_postgres(
    client: httpx.AsyncClient, settings: Settings, backend: str
) -> None:
    response = await upload(client)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    row = await stored_row(settings, job_inputs, job_id)
    assert (row.rows, row.columns) == (3, 2)
    if backend == "sqlite":  # the upload itself, byte for byte
        store = FileStore.for_settings(settings)
        assert store is not None
        assert (row.format, row.data, row.path) == ("csv", None, f"{job_id}.csv")
        assert (store.root / row.path).read_bytes() == CSV_BODY
        assert row.size_bytes == len(CSV_BODY)
    else:
        assert (row.format, row.path) == ("parquet", None)
        assert row.data
        assert stored_files(settings) == []
    done = await wait_for_status(client, job_id)
    assert done["status"] == "succeeded", done
    result = await client.get(f"/jobs/{job_id}/result", headers={"Accept": "application/json"})
    assert sorted(result.json(), key=lambda r: r["city"]) == [
        {"city": "Lima", "temp_mean": 19.0},
        {"city": "Oslo", "temp_mean": 4.0},
    ]
    # The parsed copy was read once and is gone; the upload stays with the job.
    assert stored_files(settings) == ([f"{job_id}.csv"] if backend == "sqlite" else [])


def _later() -> str:
    return (datetime.now(UTC) + timedelta(hours=1)).isoformat()


async def _run_now(settings: Settings, job_id: str) -> None:
    db = Database(settings)
    try:
        async with db.write() as conn:
            await conn.execute(update(jobs).where(jobs.c.id == job_id).values(run_at=db.now()))
    finally:
        await db.dispose()


@pytest.mark.parametrize("backend", ["sqlite"])
@pytest.mark.parametrize(
    ("media", "body"),
    [
        ("text/csv", CSV_BODY),
        (
            "application/x-ndjson",
            b'{"city":"Oslo","temp":3.5}\n{"city":"Lima","temp":19.0}\n'
            b'{"city":"Oslo","temp":4.5}\n',
        ),
    ],
)
async def test_the_parsed_copy_is_read_in_this_boot_and_the_upload_after_a_restart(
    client: httpx.AsyncClient, settings: Settings, media: str, body: bytes
) -> None:
    store = FileStore.for_settings(settings)
    assert store is not None
    params = {"steps": STEPS}
    submits = []
    for _ in range(2):  # not due for an hour: the files can be looked at before it runs
        response = await client.post(
            "/jobs",
            params={"task": "pipeline", "params": json.dumps(params), "run_at": _later()},
            content=body,
            headers={"Content-Type": media},
        )
        assert response.status_code == 202, response.text
        submits.append(response.json()["id"])
    with_copy, after_reboot = submits
    kind = "csv" if media == "text/csv" else "ndjson"
    for job_id in submits:
        assert (store.root / f"{job_id}.{kind}").read_bytes() == body
        copy = store.root / store.cache_name_for(job_id)
        assert copy.exists(), stored_files(settings)
        assert boot_tag() is not None
        assert boot_tag() in copy.name
    # After a power loss the copy may be torn; the machine's next boot has another id, so
    # the worker never opens the old one and parses the upload instead.
    old_copy = store.root / store.cache_name_for(after_reboot)
    torn = old_copy.with_name(f"{after_reboot}.cache-0000000000000000.arrow")
    old_copy.rename(torn)
    torn.write_bytes(b"ARROW1 torn by a power loss")
    results = []
    for job_id in submits:
        await _run_now(settings, job_id)
        done = await wait_for_status(client, job_id)
        assert done["status"] == "succeeded", done
        got = await client.get(f"/jobs/{job_id}/result", headers={"Accept": "application/json"})
        results.append(sorted(got.json(), key=lambda r: r["city"]))
    assert (
        results[0]
        == results[1]
        == [
            {"city": "Lima", "temp_mean": 19.0},
            {"city": "Oslo", "temp_mean": 4.0},
        ]
    )
    assert not (store.root / store.cache_name_for(with_copy)).exists()  # read once, deleted


def test_a_kept_upload_is_read_from_its_parsed_copy_when_there_is_one(tmp_path: Path) -> None:
    upload = tmp_path / "j.csv"
    upload.write_bytes(CSV_BODY)
    copy = tmp_path / "j.cache.arrow"
    marked = pd.DataFrame({"from_the_copy": [1, 2]})
    formats.write_arrow_file(pa.Table.from_pandas(marked, preserve_index=False), copy)
    pd.testing.assert_frame_equal(formats.load_input("csv", None, str(upload), str(copy)), marked)
    copy.unlink()
    parsed = formats.load_input("csv", None, str(upload), str(copy))
    pd.testing.assert_frame_equal(parsed, pd.read_csv(io.BytesIO(CSV_BODY)))


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_a_parquet_upload_is_kept_and_read_as_it_came(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    frame = pd.DataFrame({"city": ["Oslo", "Lima", "Oslo"], "temp": [3.5, 19.0, 4.5]})
    body = frame.to_parquet(index=False)
    response = await upload(client, body, **{"Content-Type": "application/vnd.apache.parquet"})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    row = await stored_row(settings, job_inputs, job_id)
    assert (row.format, row.data, row.path, row.rows) == ("parquet", None, f"{job_id}.parquet", 3)
    assert (await wait_for_status(client, job_id))["status"] == "succeeded"
    assert stored_files(settings) == [f"{job_id}.parquet"]  # no parsed copy: Parquet is typed
    got = await client.get(f"/jobs/{job_id}/result", headers={"Accept": "application/json"})
    assert sorted(got.json(), key=lambda r: r["city"]) == [
        {"city": "Lima", "temp_mean": 19.0},
        {"city": "Oslo", "temp_mean": 4.0},
    ]


async def test_a_refused_or_replayed_upload_leaves_no_file(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    bad = await upload(client, b'a,b\n1,"unterminated\n')
    assert bad.status_code == 422, bad.text
    assert stored_files(settings) == []
    first = await upload(client, **{"Idempotency-Key": "k1"})
    again = await upload(client, **{"Idempotency-Key": "k1"})
    assert (first.status_code, again.status_code) == (202, 200), again.text
    assert again.json()["id"] == first.json()["id"]
    job_id = first.json()["id"]
    store = FileStore.for_settings(settings)
    if store is None:
        assert stored_files(settings) == []
        return
    assert (await wait_for_status(client, job_id))["status"] == "succeeded"
    assert stored_files(settings) == [f"{job_id}.csv"]  # the first upload's only


@pytest.mark.parametrize("backend", ["sqlite"])  # PostgreSQL keeps inputs in the database
async def test_prune_removes_files_of_pruned_jobs_and_orphans(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    old, kept = [(await upload(client)).json()["id"] for _ in range(2)]
    for job_id in (old, kept):
        assert (await wait_for_status(client, job_id))["status"] == "succeeded"
    store = FileStore.for_settings(settings)
    assert store is not None
    # Left by crashes before their rows committed: an upload cut off, one kept, its copy.
    orphans = [
        store.root / "upload-0123456789abcdef0123456789abcdef.partial",
        store.root / "01930000-0000-7000-8000-000000000000.csv",
        store.root / "01930000-0000-7000-8000-000000000000.cache-0000000000000000.arrow",
        store.root / "01930000-0000-7000-8000-000000000002.result-1.arrow",
    ]
    young_orphan = store.root / "01930000-0000-7000-8000-000000000001.csv"
    not_ours = store.root / "sales.csv"  # someone else's file in the directory stays
    for path in (*orphans, young_orphan, not_ours):
        path.write_bytes(b"left behind")
    an_hour_ago = time.time() - ORPHAN_AGE_SECONDS - 60
    for path in (*orphans, not_ours, store.root / f"{kept}.csv"):
        os.utime(path, (an_hour_ago, an_hour_ago))

    db = Database(settings)
    try:
        async with db.write() as conn:
            await conn.execute(
                update(jobs)
                .where(jobs.c.id == old)
                .values(finished_at=db.now() - timedelta(days=9))
            )
        assert await retention.prune(db, timedelta(days=7), store) == 1
    finally:
        await db.dispose()
    # The old job's file and the old orphans are gone; a referenced file stays however old.
    assert stored_files(settings) == sorted([f"{kept}.csv", young_orphan.name, not_ours.name])
    assert (await client.get(f"/jobs/{kept}/result")).status_code == 200


def test_files_dir_defaults_beside_a_sqlite_file(tmp_path: Path) -> None:
    store = FileStore.for_settings(Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/j.db"))
    assert store is not None
    assert store.root == tmp_path / "j.db.files"
    assert FileStore.for_settings(Settings(database_url="postgresql+asyncpg://h/db")) is None
    shared = Settings(database_url="postgresql+asyncpg://h/db", files_dir=str(tmp_path / "s"))
    shared_store = FileStore.for_settings(shared)
    assert shared_store is not None
    assert shared_store.root == tmp_path / "s"


async def test_a_large_result_is_a_file_on_sqlite_and_a_row_on_postgres(
    client: httpx.AsyncClient, settings: Settings, backend: str
) -> None:
    # 60,000 rows x 3 numbers: about 1.4 MB in memory, over the 1 MiB a result file needs.
    frame = pd.DataFrame({"a": range(60_000), "b": [i * 0.5 for i in range(60_000)]})
    frame["c"] = frame["a"] % 7
    steps = [{"op": "filter", "column": "c", "cmp": ">=", "value": 0}]
    job_id = (await upload(client, frame.to_csv(index=False).encode(), steps)).json()["id"]
    assert (await wait_for_status(client, job_id))["status"] == "succeeded"
    row = await stored_row(settings, job_results, job_id)
    assert row.rows == 60_000
    if backend == "sqlite":
        assert (row.data, row.path) == (None, f"{job_id}.result-1.arrow")
        assert row.path in stored_files(settings)
    else:
        assert row.path is None
        assert row.data
    as_csv = await client.get(f"/jobs/{job_id}/result", headers={"Accept": "text/csv"})
    as_json = await client.get(f"/jobs/{job_id}/result", headers={"Accept": "application/json"})
    as_parquet = await client.get(
        f"/jobs/{job_id}/result", headers={"Accept": "application/vnd.apache.parquet"}
    )
    for got in (
        pd.read_csv(io.BytesIO(as_csv.content)),
        pd.DataFrame(as_json.json()),
        pd.read_parquet(io.BytesIO(as_parquet.content)),
    ):
        pd.testing.assert_frame_equal(got, frame, check_dtype=False)
    if backend == "sqlite":  # retention takes the result's file with the job
        db = Database(settings)
        try:
            async with db.write() as conn:
                old = db.now() - timedelta(days=9)
                await conn.execute(update(jobs).where(jobs.c.id == job_id).values(finished_at=old))
            assert await retention.prune(db, timedelta(days=7), FileStore.for_settings(settings))
        finally:
            await db.dispose()
        assert stored_files(settings) == []


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_small_results_stay_rows(client: httpx.AsyncClient, settings: Settings) -> None:
    job_id = (await upload(client)).json()["id"]
    assert (await wait_for_status(client, job_id))["status"] == "succeeded"
    row = await stored_row(settings, job_results, job_id)
    assert row.path is None
    assert row.data
    assert stored_files(settings) == [f"{job_id}.csv"]  # the input only


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_a_result_file_of_a_fenced_out_attempt_is_removed(
    client: httpx.AsyncClient, settings: Settings, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    job = await submit(client, "big_after_file", params={"path": str(release)}, data=[{"a": 1}])
    await wait_for_status(client, job["id"], {"running"})
    db = Database(settings)
    try:  # another instance takes the job over while this attempt still runs
        async with db.write() as conn:
            await conn.execute(
                update(jobs).where(jobs.c.id == job["id"]).values(lease_owner="other:1:x")
            )
    finally:
        await db.dispose()
    release.touch()
    # One worker: a job submitted now runs only after the big one's outcome was handled.
    after = await submit(client, "double", data=[{"a": 1}])
    assert (await wait_for_status(client, after["id"]))["status"] == "succeeded"
    assert stored_files(settings) == []  # no input files for JSON records, and no result file
    assert (await client.get(f"/jobs/{job['id']}")).json()["status"] == "running"


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_a_job_without_an_upload_stores_a_large_result_as_a_file(
    client: httpx.AsyncClient, settings: Settings, tmp_path: Path
) -> None:
    (tmp_path / "go").touch()
    job = await submit(client, "big_after_file", params={"path": str(tmp_path / "go")}, data=[])
    assert (await wait_for_status(client, job["id"]))["status"] == "succeeded"
    row = await stored_row(settings, job_results, job["id"])
    assert row.path == f"{job['id']}.result-1.arrow"
    assert stored_files(settings) == [row.path]


class TestASharedFilesDirectory:
    """``JOBSVC_FILES_DIR`` set: PostgreSQL instances keep inputs and results there too."""

    @pytest.fixture
    def settings(self, database_url: str, tmp_path: Path) -> Settings:
        return make_settings(database_url, files_dir=str(tmp_path / "shared"))

    async def test_inputs_and_large_results_are_files_on_either_backend(
        self, client: httpx.AsyncClient, settings: Settings, tmp_path: Path
    ) -> None:
        frame = pd.DataFrame({"a": range(100_000), "b": [i * 0.25 for i in range(100_000)]})
        steps = [{"op": "sort", "by": ["a"], "descending": True}]
        job_id = (await upload(client, frame.to_csv(index=False).encode(), steps)).json()["id"]
        assert (await wait_for_status(client, job_id))["status"] == "succeeded"
        stored_input = await stored_row(settings, job_inputs, job_id)
        result = await stored_row(settings, job_results, job_id)
        assert (stored_input.path, stored_input.data) == (f"{job_id}.csv", None)
        assert (result.path, result.data) == (f"{job_id}.result-1.arrow", None)
        assert sorted(os.listdir(tmp_path / "shared")) == [stored_input.path, result.path]
        got = await client.get(f"/jobs/{job_id}/result", headers={"Accept": "text/csv"})
        expected = frame.sort_values("a", ascending=False).reset_index(drop=True)
        pd.testing.assert_frame_equal(pd.read_csv(io.BytesIO(got.content)), expected)


async def _job(db: Database, job_id: str) -> Any:
    async with db.read() as conn:
        return (await conn.execute(select(jobs).where(jobs.c.id == job_id))).one()
