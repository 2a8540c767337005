"""8. A big table: reads with 1,000,000 finished jobs (and 250,000 more of an API key's).

The jobs are written straight into the migrated schema with ``executemany`` (PostgreSQL:
``COPY``), not through the API: the table is at revision 0004 while it fills, then ``jobsvc db
upgrade`` brings it to head (its time is reported), as an upgrade of a service that already
holds them would. Then ``jobsvc serve`` on it: the median and p99 of the first page of ``GET
/jobs`` with each filter, ``GET /ui`` and ``GET /metrics``, without API keys (the owner ``''``
and its 1,000,000 jobs) and with one (its 250,000); and the p99 of ``/healthz`` at a modest
rate while a client polls ``/ui`` every 2 s, against the same idle.

Only ``jobs`` is filled (no inputs, results or events): none of these reads touches the rest.
On SQLite; ``BENCH_BIG_TABLE_BACKENDS=postgres`` (or ``sqlite,postgres``) on PostgreSQL instead
(or too).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from bench.common import (
    POSTGRES_ADMIN_URL,
    PYTHON,
    Proc,
    Row,
    base_env,
    fmt_ms,
    jobsvc_server,
    percentile,
    progress,
    run_wrk,
    sqlite_url,
    workspace,
)
from jobsvc.api.auth import fingerprint

JOBS = 1_000_000  # the owner '' (the service without API keys)
KEY = "big-table-bench-key"
KEY_EVERY = 5  # every 5th job is the key's: 250,000 of 1,250,000
SPREAD = timedelta(days=2)  # all finished within retention (7 days): none is pruned
STATUSES = {"succeeded": 0.90, "failed": 0.07, "cancelled": 0.03}
TASKS = {"summarize": 0.60, "pipeline": 0.35, "churn": 0.05}
PARAMS = {
    "summarize": "{}",
    "pipeline": '{"steps": [{"op": "limit", "n": 10}]}',
    "churn": '{"seconds": 0.1}',
}
TRACEBACK = 'Traceback (most recent call last):\n  File "task.py", line 12, in run\n' * 4
COLUMNS = (
    "id, owner, task, status, priority, params, attempts, max_attempts, retry_delay_seconds, "
    "run_at, created_at, started_at, finished_at, updated_at, progress, error_type, "
    "error_message, error_traceback"
)
FILTERS: list[tuple[str, dict[str, Any]]] = [
    ("none", {}),
    ("status", {"status": "failed"}),
    ("task", {"task": "pipeline"}),
    ("status+task", {"status": "failed", "task": "churn"}),
    ("2 statuses", {"status": ["failed", "cancelled"]}),
]
SAMPLES = 100  # requests per endpoint, after 3 of warm-up ...
BUDGET_SECONDS = 4.0  # ... or fewer when they take longer than this (at least MIN_SAMPLES)
MIN_SAMPLES = 5
TARGET_MS = 10.0
HEALTH_CONNECTIONS = 10
HEALTH_PAUSE_MS = 50  # about 200 req/s
HEALTH_SECONDS = 10.0
UI_POLL_SECONDS = 2.0


def uuid7(ms: int, sequence: int) -> str:
    """An id of the time ``ms``, as the service makes them (UUIDv7), told apart by ``sequence``."""
    value = ms << 80 | 0x7 << 76 | (sequence & 0xFFF) << 64 | 0x2 << 62 | sequence
    hex_ = f"{value:032x}"
    return f"{hex_[:8]}-{hex_[8:12]}-{hex_[12:16]}-{hex_[16:20]}-{hex_[20:]}"


def jobs(now: datetime, time_format: str | None) -> Iterator[tuple[Any, ...]]:
    """The rows, oldest first; times as text in ``time_format`` (SQLite) or as datetimes."""
    total = JOBS + JOBS // (KEY_EVERY - 1)
    step = SPREAD / total
    start = now - SPREAD
    owner = fingerprint(KEY)
    rng = random.Random(8)  # the same table every run
    statuses = rng.choices(list(STATUSES), weights=list(STATUSES.values()), k=total)
    tasks = rng.choices(list(TASKS), weights=list(TASKS.values()), k=total)

    def at(moment: datetime) -> Any:
        return moment.strftime(time_format) if time_format else moment

    for n in range(total):
        created = start + step * n
        status, task = statuses[n], tasks[n]
        failed = status == "failed"
        yield (
            uuid7(int(created.timestamp() * 1000), n),
            owner if n % KEY_EVERY == KEY_EVERY - 1 else "",
            task,
            status,
            0,
            PARAMS[task],
            1,
            3,
            1.0,
            at(created),
            at(created),
            at(created + timedelta(milliseconds=5)),
            at(created + timedelta(milliseconds=50)),
            at(created + timedelta(milliseconds=50)),
            None if failed else 1.0,
            "ValueError" if failed else None,
            "the column 'price' is not in the table" if failed else None,
            TRACEBACK if failed else None,
        )


def migrate(database_url: str, revision: str | None) -> float:
    """``jobsvc db upgrade`` (or to ``revision``) in the code under test; its seconds."""
    env = base_env(JOBSVC_DATABASE_URL=database_url)
    if revision is None:
        argv = [PYTHON, "-m", "jobsvc.cli", "db", "upgrade"]
    else:
        code = "from jobsvc import migrate; from jobsvc.settings import Settings; "
        argv = [PYTHON, "-c", code + f"migrate.upgrade(Settings(), {revision!r})"]
    started = time.monotonic()
    subprocess.run(argv, env=env, check=True, capture_output=True)
    return time.monotonic() - started


def fill_sqlite(path: Path) -> None:
    placeholders = ", ".join("?" * len(COLUMNS.split(",")))
    with contextlib.closing(sqlite3.connect(path)) as db:
        # A load, not a service: no journal and no fsync (the service sets WAL again).
        db.execute("PRAGMA journal_mode=OFF")
        db.execute("PRAGMA synchronous=OFF")
        with db:
            db.executemany(
                f"INSERT INTO jobs ({COLUMNS}) VALUES ({placeholders})",
                jobs(datetime.now(UTC), "%Y-%m-%d %H:%M:%S.%f"),
            )


def fill_postgres(url: str) -> None:
    async def fill() -> None:
        db = await asyncpg.connect(url)
        try:
            columns = [name.strip() for name in COLUMNS.split(",")]
            await db.copy_records_to_table(
                "jobs", records=jobs(datetime.now(UTC), None), columns=columns
            )
            # What autovacuum would have gathered by the time a table is this big.
            await db.execute("VACUUM ANALYZE jobs")
        finally:
            await db.close()

    asyncio.run(fill())


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh database on the server at ``POSTGRES_ADMIN_URL`` (its libpq URL), dropped after."""
    name = f"jobsvc_bench_{os.getpid()}_big"

    async def admin(*statements: str) -> None:
        db = await asyncpg.connect(POSTGRES_ADMIN_URL + "/postgres", timeout=5)
        try:
            for statement in statements:
                await db.execute(statement)
        finally:
            await db.close()

    drop = f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
    asyncio.run(admin(drop, f'CREATE DATABASE "{name}"'))
    try:
        yield f"{POSTGRES_ADMIN_URL}/{name}"
    finally:
        asyncio.run(admin(drop))


def timings(client: httpx.Client, path: str, params: dict[str, Any]) -> list[float]:
    """Seconds per request, one at a time, after a warm-up."""
    for _ in range(3):
        check(client.get(path, params=params), path)
    samples: list[float] = []
    deadline = time.monotonic() + BUDGET_SECONDS
    while len(samples) < SAMPLES and (len(samples) < MIN_SAMPLES or time.monotonic() < deadline):
        started = time.perf_counter()
        response = client.get(path, params=params)
        samples.append(time.perf_counter() - started)
        check(response, path)
    return samples


def check(response: httpx.Response, path: str) -> None:
    response.raise_for_status()
    if path == "/jobs":
        assert len(response.json()["items"]) == 50, "a full first page"


class Figures:
    """Median and p99 per endpoint, by name."""

    def __init__(self) -> None:
        self.by_name: dict[str, list[float]] = {}

    def measure(self, client: httpx.Client, name: str, path: str, params: dict[str, Any]) -> None:
        samples = timings(client, path, params)
        self.by_name[name] = samples
        progress(f"  {name}: {self.describe(name)}")

    def median(self, name: str) -> float:
        return percentile(self.by_name[name], 50)

    def describe(self, name: str) -> str:
        samples = self.by_name[name]
        return (
            f"median {fmt_ms(self.median(name))}, p99 {fmt_ms(percentile(samples, 99))} "
            f"({len(samples)} requests)"
        )


def read_everything(server: Proc, figures: Figures, who: str, headers: dict[str, str]) -> None:
    with httpx.Client(base_url=server.url, timeout=60, headers=headers) as client:
        for label, params in FILTERS:
            figures.measure(client, f"{who} /jobs {label}", "/jobs", {"limit": 50, **params})
        figures.measure(client, f"{who} /ui", "/ui", {})
        figures.measure(client, f"{who} /metrics", "/metrics", {})


@contextlib.contextmanager
def ui_poller(url: str) -> Iterator[list[float]]:
    """GET /ui every 2 s (a dashboard left open) until the block ends; their seconds."""
    seconds: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while not stop.is_set():
                started = time.perf_counter()
                client.get("/ui").raise_for_status()
                seconds.append(time.perf_counter() - started)
                stop.wait(UI_POLL_SECONDS)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield seconds
    finally:
        stop.set()
        thread.join()


def health_p99(server: Proc) -> tuple[float, dict[int, int]]:
    args = {
        "connections": HEALTH_CONNECTIONS,
        "pgid": server.pid,
        "args": ["/healthz", str(HEALTH_PAUSE_MS)],
    }
    run_wrk(server.url, "get_path_paced.lua", seconds=1.0, **args)  # warm-up
    result = run_wrk(server.url, "get_path_paced.lua", seconds=HEALTH_SECONDS, **args)
    return result.latency_us["p99"] / 1000, result.statuses


def run_on(backend: str, tmp: Path, database_url: str) -> list[Row]:
    total = JOBS + JOBS // (KEY_EVERY - 1)
    progress(f"8. big table ({backend}): {total:,} finished jobs, written straight in")
    migrate(database_url, "0004")
    started = time.monotonic()
    if backend == "SQLite":
        fill_sqlite(tmp / "jobs.db")
    else:
        fill_postgres(database_url.replace("postgresql+asyncpg://", "postgresql://", 1))
    filled = time.monotonic() - started
    upgraded = migrate(database_url, None)
    size = ""
    if backend == "SQLite":
        size = f", {(tmp / 'jobs.db').stat().st_size / 1e9:.2f} GB"
    progress(f"  filled in {filled:.0f} s{size}; `jobsvc db upgrade` took {upgraded:.1f} s")

    figures = Figures()
    with jobsvc_server(tmp, workers=1, database_url=database_url) as server:
        read_everything(server, figures, "open", {})
        idle_p99, idle_statuses = health_p99(server)
        with ui_poller(server.url) as polls:
            busy_p99, busy_statuses = health_p99(server)
    progress(
        f"  /healthz p99 idle {idle_p99:.1f} ms, while /ui is polled {busy_p99:.1f} ms "
        f"(/ui took {', '.join(fmt_ms(s) for s in polls)})"
    )
    keyed = {"JOBSVC_API_KEYS": KEY}
    with jobsvc_server(tmp, workers=1, database_url=database_url, name="keyed", **keyed) as server:
        read_everything(server, figures, "key", {"Authorization": f"Bearer {KEY}"})

    pages = [name for name in figures.by_name if "/jobs" in name]
    slowest_page = max(pages, key=figures.median)
    uis = [name for name in figures.by_name if name.endswith("/ui")]
    metrics = [name for name in figures.by_name if name.endswith("/metrics")]
    slowest_ui = max(uis, key=figures.median)
    slowest_metrics = max(metrics, key=figures.median)
    ratio = busy_p99 / idle_p99
    setup = (
        f"{JOBS:,} finished jobs of the owner '' and {total - JOBS:,} of an API key's, "
        f"interleaved, over {SPREAD.days} days (statuses {STATUSES}, tasks {TASKS}){size}; "
        f"filled in {filled:.0f} s, then `jobsvc db upgrade` "
        f"{upgraded:.1f} s. `jobsvc serve`, `JOBSVC_WORKERS=1`; one request at a time from "
        f"httpx, up to {SAMPLES} per endpoint after 3 of warm-up (at most "
        f"{BUDGET_SECONDS:g} s of them, at least {MIN_SAMPLES}); 'open' without API keys, "
        "'key' with one."
    )
    page_notes = [setup] + [f"{name}: {figures.describe(name)}." for name in pages]
    health_notes = [
        f"wrk, {HEALTH_CONNECTIONS} connections each pausing ~{HEALTH_PAUSE_MS} ms, "
        f"{HEALTH_SECONDS:g} s each: idle statuses {idle_statuses}, p99 {idle_p99:.1f} ms; "
        f"while another client GETs /ui every {UI_POLL_SECONDS:g} s (each took "
        f"{', '.join(fmt_ms(s) for s in polls)}): statuses {busy_statuses}, "
        f"p99 {busy_p99:.1f} ms."
    ]
    return [
        Row(
            f"8. Big table ({backend}): first page of `GET /jobs`, slowest filter (median)",
            fmt_ms(figures.median(slowest_page)),
            slowest_page,
            "",
            f"<= {TARGET_MS:g} ms",
            figures.median(slowest_page) * 1000 <= TARGET_MS,
            page_notes,
        ),
        Row(
            f"8. Big table ({backend}): `GET /ui` (median)",
            fmt_ms(figures.median(slowest_ui)),
            slowest_ui,
            "",
            f"<= {TARGET_MS:g} ms",
            figures.median(slowest_ui) * 1000 <= TARGET_MS,
            [f"{name}: {figures.describe(name)}." for name in uis],
        ),
        Row(
            f"8. Big table ({backend}): `GET /metrics` (median)",
            fmt_ms(figures.median(slowest_metrics)),
            slowest_metrics,
            "",
            f"<= {TARGET_MS:g} ms",
            figures.median(slowest_metrics) * 1000 <= TARGET_MS,
            [f"{name}: {figures.describe(name)}." for name in metrics],
        ),
        Row(
            f"8. Big table ({backend}): p99 `/healthz` while `/ui` is polled",
            f"{busy_p99:.1f} ms",
            f"idle {idle_p99:.1f} ms",
            f"{ratio:.2f}x idle",
            "<= 1.5x idle",
            ratio <= 1.5,
            health_notes,
        ),
    ]


def run() -> list[Row]:
    rows: list[Row] = []
    backends = os.environ.get("BENCH_BIG_TABLE_BACKENDS", "sqlite").split(",")
    if "sqlite" in backends:
        with workspace("big-table") as tmp:
            rows += run_on("SQLite", tmp, sqlite_url(tmp))
    if "postgres" in backends:
        with workspace("big-table-pg") as tmp, postgres_database() as url:
            asyncpg_url = url.replace("postgresql://", "postgresql+asyncpg://", 1)
            rows += run_on("PostgreSQL", tmp, asyncpg_url)
    return rows
