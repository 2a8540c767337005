"""The idle-work policy (``runner.idle_work``): the API's conversions and upload checks run on
an idle worker process, else on a converter process; a checked upload's table stays in the
worker for its job, which then runs there without parsing the upload again. Both backends."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from jobsvc import formats
from jobsvc import repository as repo
from jobsvc.converter import ConverterPool
from jobsvc.db import Database
from jobsvc.errors import InvalidData, NeedsMoreMemory
from jobsvc.files import FileStore
from jobsvc.runner.idle_work import IdleWorkConverter
from jobsvc.runner.runner import Runner
from jobsvc.settings import Settings
from jobsvc.submission import InputData, NewJob
from tests.conftest import make_settings, submit, wait_for_status

CSV_BODY = b"city,temp\nOslo,3.5\nLima,19.0\nOslo,4.5\n"
LIMITS = formats.Limits(max_rows=100, max_columns=10, max_cell_chars=100)


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return make_settings(database_url, files_dir=str(tmp_path / "files"))


@pytest.fixture
async def running(settings: Settings) -> AsyncIterator[tuple[Runner, IdleWorkConverter]]:
    db = Database(settings)
    runner = Runner(settings, db)
    fallback = ConverterPool(1)
    await runner.start()
    try:
        converter = runner.idle_work(fallback)
        assert isinstance(converter, IdleWorkConverter)
        yield runner, converter
    finally:
        await runner.stop()
        fallback.shutdown()
        await db.dispose()


def new_upload(settings: Settings, body: bytes) -> tuple[FileStore, Path]:
    store = FileStore.for_settings(settings)
    assert store is not None
    store.prepare()
    path = store.new_upload_path()
    path.write_bytes(body)
    return store, path


async def until_idle(runner: Runner, timeout: float = 10.0) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while (process := runner.pool.take_now()) is None:
        assert time.monotonic() < deadline, "no worker process came back to the pool"
        await asyncio.sleep(0.01)
    runner.pool.give_back(process)


async def job_status(db: Database, job_id: str) -> Any:
    async with db.read() as conn:
        return await repo.get_job(conn, job_id)


async def test_a_job_runs_where_its_upload_was_checked_with_the_table_parsed_there(
    running: tuple[Runner, IdleWorkConverter], settings: Settings
) -> None:
    runner, converter = running
    store, upload = new_upload(settings, CSV_BODY)
    await until_idle(runner)
    job_id = repo.new_job_id()
    parsed = await converter.check_upload(job_id, str(upload), formats.CSV, LIMITS, False)
    assert parsed is not None
    assert (parsed.format, parsed.rows, parsed.columns) == ("csv", 3, 2)
    assert runner.pool.take_now() is None  # the one worker holds the table for the job
    # The input names a file that is gone: only the held table can make the job succeed.
    upload.unlink()
    job = NewJob(task="double", params={}, max_attempts=1, retry_delay_seconds=0.01, id=job_id)
    async with runner.db.write() as conn:
        await repo.insert_jobs(
            conn, [(job, InputData("csv", None, 3, 2, path=f"{job_id}.csv"))], runner.db.now()
        )
    runner.notify()
    deadline = time.monotonic() + 30
    while (row := await job_status(runner.db, job_id)).status not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, row
        await asyncio.sleep(0.02)
    assert (row.status, row.error_message) == ("succeeded", None)
    assert os.listdir(store.root) == []  # no parsed copy was written


async def test_a_refused_upload_is_raised_and_a_forgotten_table_frees_its_process(
    running: tuple[Runner, IdleWorkConverter], settings: Settings
) -> None:
    runner, converter = running
    _, bad = new_upload(settings, b'a,b\n1,"unterminated\n')
    await until_idle(runner)
    with pytest.raises(InvalidData, match="cannot be parsed"):
        await converter.check_upload("x", str(bad), formats.CSV, LIMITS, False)
    _, good = new_upload(settings, CSV_BODY)
    assert await converter.check_upload("y", str(good), formats.CSV, LIMITS, False) is not None
    assert runner.pool.take_now() is None  # held for job y
    await converter.forget_upload("y")
    process = runner.pool.take_now()
    assert process is not None
    assert process.held_job is None
    runner.pool.give_back(process)


async def test_conversions_run_on_an_idle_worker_else_in_a_converter_process(
    app: Any, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    # A worker process that is idle anyway does the API's conversions; a converter process
    # is started only while every worker is busy, so that a download never waits for a job.
    runner, service = app.state.queue.runner, app.state.queue.service
    workers = set(runner.pool.pids())
    await until_idle(runner)
    assert await service.convert(os.getpid) in workers
    release = tmp_path / "release"
    holder = await submit(client, "wait_for_file", params={"path": str(release)})
    await wait_for_status(client, holder["id"], "running")
    elsewhere = await service.convert(os.getpid)
    assert elsewhere not in workers
    assert elsewhere != os.getpid()
    release.touch()
    assert (await wait_for_status(client, holder["id"]))["status"] == "succeeded"


def allocate(size: int) -> int:
    """Needs ``size`` bytes at once (run in another process)."""
    return len(bytearray(size))


async def test_api_work_on_a_worker_is_held_to_the_converters_memory_cap(
    database_url: str, tmp_path: Path
) -> None:
    # A worker process doing the API's work may grow no more than a converter process:
    # past that the request is refused (after the converter, held to the same cap, fails
    # too), and the worker, its own cap restored, goes on running jobs.
    settings = make_settings(database_url, converter_memory_mb=256)
    db = Database(settings)
    runner = Runner(settings, db)
    fallback = ConverterPool(1, memory_mb=256)
    await runner.start()
    try:
        converter = runner.idle_work(fallback)
        await until_idle(runner)
        worker = runner.pool.pids()
        with pytest.raises(NeedsMoreMemory):
            await converter.run(allocate, 2 * 2**30)
        assert runner.pool.pids() == worker  # the same process, alive
        assert await converter.run(allocate, 64 * 2**20) == 64 * 2**20
        assert await converter.run(os.getpid) in worker
    finally:
        await runner.stop()
        fallback.shutdown()
        await db.dispose()
