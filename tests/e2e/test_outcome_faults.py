"""An outcome is never thrown away: a finished attempt whose outcome cannot be written at once
(SQLite locked by another process, a full disk, PostgreSQL restarting) is kept and written
later; the task is not run again for that reason. Every job here runs once: attempts 1.

Real faults on a real ``jobsvc serve``: another OS process holding SQLite's write lock, a small
tmpfs filled up (needs root: skipped elsewhere unless JOBSVC_TEST_REQUIRE_FAULTS is set, as in
``test_faults``), and the local PostgreSQL cluster stopped and started again (skipped when
PostgreSQL is not there, unless JOBSVC_TEST_REQUIRE_POSTGRES is set, as in ``conftest``).

Each task (``counted_wait``) appends a line to its marker file when it starts and another when
it returns, so a test knows that its outcome is on its way while the fault lasts, and how many
times it ran.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import pg_ctl, pg_running
from tests.live_jobs import (
    get_events,
    marker_lines,
    submit,
    wait_all_terminal,
    wait_running_task,
    wait_terminal,
    wait_until,
)
from tests.live_server import LiveServer
from tests.storage_faults import checkpoint_truncate, fill, mounted

pytestmark = pytest.mark.slow

LEASE_SECONDS = 3.0
# How long each fault lasts: past SQLite's busy timeout, most of the lease.
FAULT_SECONDS = 2.5

# Another process's write lock on the database: BEGIN IMMEDIATE, held for a while.
LOCK_HOLDER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("ROLLBACK")
conn.close()
"""


def ran_once(marker: Path) -> tuple[int, int]:
    """(starts, returns) of a ``counted_wait`` task."""
    return marker_lines(marker, "started"), marker_lines(marker, "finished")


def assert_succeeded_once(job: dict[str, Any], events: list[dict[str, Any]], log: str) -> None:
    assert (job["status"], job["attempts"], job["error"]) == ("succeeded", 1, None), (job, log)
    assert [e["status"] for e in events] == ["queued", "running", "succeeded"], (events, log)


@pytest.fixture
def sqlite_file(tmp_path: Path, sqlite_template: Path) -> Path:
    path = tmp_path / "jobsvc.db"
    shutil.copyfile(sqlite_template, path)
    return path


def test_an_outcome_waits_out_another_process_holding_the_sqlite_write_lock(
    sqlite_file: Path, tmp_path: Path
) -> None:
    marker, release = tmp_path / "marker", tmp_path / "release"
    server = LiveServer(
        f"sqlite+aiosqlite:///{sqlite_file}",
        tmp_path / "server.log",
        JOBSVC_SQLITE_BUSY_TIMEOUT_MS="200",
        JOBSVC_LEASE_SECONDS=str(LEASE_SECONDS),
    )
    with server, httpx.Client(base_url=server.url, timeout=10) as http:
        job_id = submit(http, "counted_wait", {"marker": str(marker), "path": str(release)})
        wait_running_task(http, job_id)

        with subprocess.Popen(
            [sys.executable, "-c", LOCK_HOLDER, str(sqlite_file), str(FAULT_SECONDS)],
            stdout=subprocess.PIPE,
            text=True,
        ) as holder:
            try:
                assert holder.stdout is not None
                assert holder.stdout.readline().strip() == "locked"
                release.touch()
                wait_until(lambda: ran_once(marker)[1] == 1, 10, "the task to return")
                # The task returned while the lock was still held: its outcome had to wait.
                assert holder.poll() is None, "the lock was let go before the task returned"
                assert holder.wait(30) == 0
            finally:
                if holder.poll() is None:
                    holder.kill()

        done = wait_terminal(http, job_id, timeout=60)
        events = get_events(http, job_id)
    assert_succeeded_once(done, events, server.log()[-4000:])
    assert ran_once(marker) == (1, 1)


def sqlite_write_refused(path: Path) -> str | None:
    """The error a small write to ``path`` meets now, or None if it went through."""
    conn = sqlite3.connect(path, timeout=5, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("CREATE TABLE fault_probe (x BLOB)")
        conn.execute("INSERT INTO fault_probe VALUES (randomblob(65536))")
        conn.execute("COMMIT")
    except sqlite3.OperationalError as error:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        return str(error)
    finally:
        conn.close()
    with sqlite3.connect(path, timeout=5, isolation_level=None) as tidy:
        tidy.execute("DROP TABLE fault_probe")
    tidy.close()
    return None


def test_an_outcome_waits_out_a_full_disk(tmp_path: Path, sqlite_template: Path) -> None:
    marker, release = tmp_path / "marker", tmp_path / "release"
    with mounted("-t", "tmpfs", "-o", "size=8m", "tmpfs", target=tmp_path / "disk") as disk:
        path = disk / "jobsvc.db"
        shutil.copyfile(sqlite_template, path)
        server = LiveServer(
            f"sqlite+aiosqlite:///{path}",
            tmp_path / "server.log",
            JOBSVC_LEASE_SECONDS=str(LEASE_SECONDS),
        )
        with server, httpx.Client(base_url=server.url, timeout=10) as http:
            job_id = submit(http, "counted_wait", {"marker": str(marker), "path": str(release)})
            wait_running_task(http, job_id)

            checkpoint_truncate(path)
            filler = fill(disk)
            filled_at = time.monotonic()
            try:
                refused = sqlite_write_refused(path)
                assert refused is not None, "the full disk still took a write: no fault"
                assert "full" in refused, refused
                release.touch()
                wait_until(lambda: ran_once(marker)[1] == 1, 10, "the task to return")
                # The fault lasts its time from when it began (not a synchronisation).
                time.sleep(max(0.0, filled_at + FAULT_SECONDS - time.monotonic()))
            finally:
                filler.unlink()

            done = wait_terminal(http, job_id, timeout=60)
            events = get_events(http, job_id)
    assert_succeeded_once(done, events, server.log()[-4000:])
    assert ran_once(marker) == (1, 1)


# --- PostgreSQL restarting ---------------------------------------------------------------------

PG_JOBS = 5


def test_outcomes_wait_out_a_postgresql_restart(
    pg_database_url: str, cluster: list[str], tmp_path: Path
) -> None:
    # (The cluster fixture comes after the database's: its teardown, starting the cluster if
    # the test left it stopped, runs before the database is dropped.)
    release = tmp_path / "release"
    markers = [tmp_path / f"marker-{i}" for i in range(PG_JOBS)]
    server = LiveServer(
        pg_database_url,
        tmp_path / "server.log",
        JOBSVC_WORKERS=str(PG_JOBS),
        # Long enough that no lease runs out while the server is down: this is about the writes.
        JOBSVC_LEASE_SECONDS="10",
    )
    with server, httpx.Client(base_url=server.url, timeout=10) as http:
        ids = [
            submit(http, "counted_wait", {"marker": str(marker), "path": str(release)})
            for marker in markers
        ]
        for job_id in ids:
            wait_running_task(http, job_id)

        try:
            pg_ctl(cluster, "stop")
            release.touch()
            wait_until(
                lambda: all(ran_once(marker)[1] == 1 for marker in markers),
                15,
                "every task to return",
            )
        finally:
            if not pg_running(cluster):
                pg_ctl(cluster, "start")

        jobs = wait_all_terminal(http, ids, timeout=90)
        events = {job_id: get_events(http, job_id) for job_id in ids}
    log = server.log()[-4000:]
    for job_id in ids:
        assert_succeeded_once(jobs[job_id], events[job_id], log)
    assert [ran_once(marker) for marker in markers] == [(1, 1)] * PG_JOBS
