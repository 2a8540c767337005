"""Retention (finished jobs pruned with everything they own) and logs that name the job."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select, update

from jobsvc import logs, retention
from jobsvc.db import Database
from jobsvc.models import job_events, job_inputs, jobs
from tests.conftest import submit, wait_for_status
from tests.live_server import LiveServer, server_env


async def count(db: Database, table: object) -> int:
    async with db.read() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())  # type: ignore[arg-type]


async def test_prune_deletes_old_finished_jobs_with_their_rows(
    client: httpx.AsyncClient, db: Database
) -> None:
    old = await submit(client, "double", data=[{"a": 1}])
    recent = await submit(client, "double", data=[{"a": 2}])
    for job in (old, recent):
        await wait_for_status(client, job["id"])
    async with db.write() as conn:
        ten_days_ago = db.now() - timedelta(days=10)
        await conn.execute(
            update(jobs).where(jobs.c.id == old["id"]).values(finished_at=ten_days_ago)
        )
    assert await retention.prune(db, timedelta(days=7)) == 1
    assert (await client.get(f"/jobs/{old['id']}")).status_code == 404
    assert (await client.get(f"/jobs/{recent['id']}")).json()["status"] == "succeeded"
    assert await count(db, job_inputs) == 1
    async with db.read() as conn:
        orphans = (
            await conn.execute(
                select(func.count()).select_from(job_events).where(job_events.c.job_id == old["id"])
            )
        ).scalar_one()
    assert orphans == 0
    assert await retention.prune(db, timedelta(days=7)) == 0


def test_parse_age() -> None:
    assert retention.parse_age("30d") == timedelta(days=30)
    assert retention.parse_age("90m") == timedelta(minutes=90)
    with pytest.raises(ValueError, match="not an age"):
        retention.parse_age("soon")


def test_ages_are_described_in_their_largest_exact_unit() -> None:
    described = [
        retention.describe_age(retention.parse_age(text))
        for text in ("30d", "2w", "1d", "36h", "90m", "45s", "1.5s")
    ]
    assert described == [
        "30 days", "14 days", "1 day", "36 hours", "90 minutes", "45 seconds", "1.5 seconds"
    ]  # fmt: skip


def test_db_prune_command(database_url: str) -> None:
    env = server_env(database_url)
    command = [sys.executable, "-m", "jobsvc.cli", "db", "prune", "--older-than", "30d"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "deleted 0 jobs that finished more than 30 days ago" in done.stdout
    bad = subprocess.run(
        [*command[:-1], "someday"], env=env, capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 1
    assert "not an age" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_json_lines_carry_the_job(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("info", "json")
    try:
        with logs.job_context("job-123", 2):
            logging.getLogger("jobsvc.test").info("inside")
        logging.getLogger("jobsvc.test").info("outside")
    finally:
        logging.getLogger().handlers.clear()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert lines[0]["message"] == "inside"
    assert (lines[0]["job_id"], lines[0]["attempt"]) == ("job-123", 2)
    assert lines[1]["job_id"] is None


def test_a_tasks_own_log_lines_name_its_job(database_url: str, tmp_path: Path) -> None:
    """A real server with JSON logs: the line a task logs in its worker process names the job."""
    log_path = tmp_path / "server.log"
    with LiveServer(database_url, log_path, JOBSVC_LOG_FORMAT="json") as server:
        response = httpx.post(
            f"{server.url}/jobs", json={"task": "chatty", "params": {"words": "quack"}}
        )
        job_id = response.json()["id"]
        deadline = time.monotonic() + 30
        while httpx.get(f"{server.url}/jobs/{job_id}").json()["status"] != "succeeded":
            assert time.monotonic() < deadline, "the chatty job never finished"
            time.sleep(0.05)
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    said = [line for line in lines if line["message"] == "the task says quack"]
    assert len(said) == 1
    assert (said[0]["job_id"], said[0]["attempt"]) == (job_id, 1)
    assert any(line["logger"] == "uvicorn.access" for line in lines)  # one format for all
