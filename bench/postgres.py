"""7. PostgreSQL: the drain rate of 1,000 queued small jobs against procrastinate on the same
server, and submit-to-start latency when the job runs on another instance.

Skipped, with a note, when PostgreSQL does not answer at ``BENCH_POSTGRES_URL``
(default postgresql://postgres@127.0.0.1:5432). Creates and drops ``jobsvc_bench_*`` databases.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg

from bench.common import (
    POSTGRES_ADMIN_URL,
    PYTHON,
    Proc,
    Row,
    base_env,
    fmt_ms,
    jobsvc_server,
    jobsvc_worker,
    percentile,
    profiler,
    progress,
    submit_small,
    workspace,
)
from bench.latency import start_latencies
from bench.small_jobs import records

N = 1000
WORKERS = 2
SUBMIT_MARGIN = 8.0  # seconds between the submits and the moment the jobs become due
TIMEOUT = 120.0
LATENCY_JOBS = 100


def reachable() -> str | None:
    try:
        with psycopg.connect(POSTGRES_ADMIN_URL + "/postgres", connect_timeout=3):
            return None
    except psycopg.Error as error:
        return str(error).strip().splitlines()[0]


@contextlib.contextmanager
def database(suffix: str) -> Iterator[str]:
    """A fresh database; its libpq URL. Dropped afterwards, connections and all."""
    name = f"jobsvc_bench_{os.getpid()}_{suffix}"
    with psycopg.connect(POSTGRES_ADMIN_URL + "/postgres", autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{POSTGRES_ADMIN_URL}/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL + "/postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def asyncpg_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+asyncpg://", 1)


def query(url: str, sql: str) -> Any:
    with psycopg.connect(url) as conn:
        row = conn.execute(sql).fetchone()
        assert row is not None
        return row


def wait_for(url: str, sql: str, n: int, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while (done := query(url, sql)[0]) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: {done} of {n} done after {TIMEOUT:g} s")
        time.sleep(0.05)


async def submit_due_later(url: str, run_at: datetime) -> None:
    limits = httpx.Limits(max_connections=16)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        semaphore = asyncio.Semaphore(16)

        async def one(i: int) -> None:
            body = {"task": "summarize", "data": records(i), "run_at": run_at.isoformat()}
            async with semaphore:
                (await client.post("/jobs", json=body)).raise_for_status()

        await asyncio.gather(*(one(i) for i in range(N)))


def jobsvc_drain(tmp: Path, url: str) -> tuple[float, bool]:
    """Submit N jobs due a few seconds later, then let the server's workers drain them."""
    db_url = asyncpg_url(url)
    with jobsvc_server(tmp, workers=WORKERS, database_url=db_url) as server:
        run_at = datetime.now(UTC) + timedelta(seconds=SUBMIT_MARGIN)
        asyncio.run(submit_due_later(server.url, run_at))
        in_time = datetime.now(UTC) < run_at
        with profiler(server.pid, "postgres-drain", SUBMIT_MARGIN + 4):
            wait_for(url, "select count(*) from jobs where status = 'succeeded'", N, "jobsvc")
    first, last = query(url, "select min(started_at), max(finished_at) from jobs")
    return N / (last - first).total_seconds(), in_time


def procrastinate_drain(tmp: Path, url: str) -> float:
    env = base_env(BENCH_PROCRASTINATE_DSN=url)
    os.environ["BENCH_PROCRASTINATE_DSN"] = url
    from bench.procrastinate_peer import app, summarize

    cli = [PYTHON, "-m", "procrastinate", "--app=bench.procrastinate_peer.app"]
    subprocess.run([*cli, "schema", "--apply"], env=env, check=True, capture_output=True)
    with app.open():
        summarize.batch_defer(*({"records": records(i)} for i in range(N)))
    workers = [
        Proc(
            f"procrastinate-{k}",
            [*cli, "worker", "--concurrency", "1", "--one-shot"],
            env,
            tmp,
            ready_path=None,
            ready_text="",  # nothing to wait for: the jobs are already queued
        )
        for k in range(WORKERS)
    ]
    try:
        for worker in workers:
            worker.start()
        wait_for(
            url,
            "select count(*) from procrastinate_jobs where status = 'succeeded'",
            N,
            "procrastinate",
        )
    finally:
        for worker in workers:
            worker.stop()
    first, last = query(
        url,
        "select min(at) filter (where type = 'started'), max(at) filter (where type = "
        "'succeeded') from procrastinate_events",
    )
    return float(N / (last - first).total_seconds())


def cross_instance_latency(tmp: Path, url: str) -> tuple[list[float], int]:
    """Server A's only worker is held busy; a ``jobsvc worker`` B runs every job A accepts."""
    db_url = asyncpg_url(url)
    a = jobsvc_server(tmp, workers=1, database_url=db_url, name="jobsvc-a")
    with a, httpx.Client(base_url=a.url, timeout=30) as client:
        hold = client.post(
            "/jobs", json={"task": "hold", "params": {"seconds": 120}, "data": [{"a": 1}]}
        ).json()["id"]
        deadline = time.monotonic() + 30
        while client.get(f"/jobs/{hold}").json()["status"] != "running":
            if time.monotonic() > deadline:
                raise TimeoutError("the holding job never started")
            time.sleep(0.05)
        with jobsvc_worker(tmp, workers=1, database_url=db_url):
            submit_small(client)
            latencies = start_latencies(a.url, LATENCY_JOBS)
        workers = query(
            url,
            "select count(distinct worker) from job_events "
            f"where status = 'running' and job_id != '{hold}'",
        )[0]
    return latencies, int(workers)


def run() -> list[Row]:
    progress("7. PostgreSQL: drain rate against procrastinate; cross-instance latency")
    problem = reachable()
    if problem:
        progress(f"  skipped: PostgreSQL does not answer ({problem})")
        return [
            Row(
                "7. PostgreSQL", "skipped", "", "", "", None, [f"PostgreSQL unreachable: {problem}"]
            )
        ]
    with workspace("pg-drain") as tmp, database("drain") as url:
        ours, in_time = jobsvc_drain(tmp, url)
    progress(f"  jobsvc drains {ours:,.0f} jobs/s")
    with workspace("pg-procrastinate") as tmp, database("procrastinate") as url:
        theirs = procrastinate_drain(tmp, url)
    progress(f"  procrastinate drains {theirs:,.0f} jobs/s")
    with workspace("pg-latency") as tmp, database("latency") as url:
        latencies, workers = cross_instance_latency(tmp, url)
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    progress(f"  cross-instance submit-to-start p50 {fmt_ms(p50)}, p99 {fmt_ms(p99)}")
    ratio = ours / theirs
    notes = [
        f"{N} `summarize` jobs (5 records each) submitted over HTTP to `jobsvc serve` with "
        f"`run_at` {SUBMIT_MARGIN:g} s ahead "
        f"({'all stored before then' if in_time else 'SOME SUBMITS WERE LATE'}), drained by "
        f"its {WORKERS} worker processes; procrastinate: the same jobs batch-deferred, "
        f"then {WORKERS} `procrastinate worker --concurrency 1` processes. Both: N / (last "
        "finish - first start), from each one's own timestamps in PostgreSQL.",
        f"Cross-instance: {len(latencies)} jobs submitted one at a time to server A, whose "
        f"only worker was held by a sleeping job; {workers} other worker(s) ran them (a "
        f"`jobsvc worker`, woken by NOTIFY). p99 {fmt_ms(p99)}, max {fmt_ms(max(latencies))}.",
    ]
    return [
        Row(
            "7. PostgreSQL drain rate (jobs/s)",
            f"{ours:,.0f}",
            f"procrastinate {theirs:,.0f}",
            f"{ratio:.2f}x",
            ">= 1.0x",
            ratio >= 1.0,
            notes,
        ),
        Row(
            "7. PostgreSQL submit-to-start across instances (p50)",
            fmt_ms(p50),
            "",
            "",
            "<= 50 ms",
            p50 <= 0.050,
            [],
        ),
    ]
