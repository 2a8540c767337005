"""Chaos: jobs submitted while the server and its worker processes are killed at random.

Every job that got a 202 must end terminal, each result stored once, the database intact.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.live_server import LiveServer, group_members

JOBS = 300
ROUNDS = 10


def submitter(server_url: list[str], accepted: list[str], stop: threading.Event) -> None:
    """Submits until told to stop or JOBS were accepted; a refused or cut-off request is
    simply not accepted (the client would retry it)."""
    with httpx.Client(timeout=5) as http:
        while not stop.is_set() and len(accepted) < JOBS:
            try:
                response = http.post(
                    f"{server_url[0]}/jobs",
                    json={
                        "task": "nap",
                        "params": {"seconds": 0.05, "steps": 2},
                        "data": [],
                        "max_attempts": 20,
                    },
                )
            except httpx.TransportError:
                time.sleep(0.05)  # the server is down: a client backs off and tries again
                continue
            if response.status_code == 202:
                accepted.append(response.json()["id"])


@pytest.mark.slow
def test_random_kills_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    database = tmp_path / "jobsvc.db"
    url = f"sqlite+aiosqlite:///{database}"
    env = {"JOBSVC_WORKERS": "2", "JOBSVC_LEASE_SECONDS": "3"}
    chaos = random.Random(20261125)
    server = LiveServer(url, tmp_path / "server.log", **env).start()
    current_url = [server.url]
    accepted: list[str] = []
    stop = threading.Event()
    thread = threading.Thread(target=submitter, args=(current_url, accepted, stop), daemon=True)
    thread.start()
    kills = Counter[str]()
    try:
        for _ in range(ROUNDS):
            time.sleep(chaos.uniform(0.3, 1.0))  # chaos timing, not a wait for a state
            workers = [pid for pid in group_members(server.pid) if pid != server.pid]
            if workers and chaos.random() < 0.6:
                os.kill(chaos.choice(workers), signal.SIGKILL)
                kills["worker process"] += 1
            else:
                server.kill9()
                kills["server"] += 1
                server = LiveServer(url, tmp_path / "server.log", **env).start()
                current_url[0] = server.url
        stop.set()
        thread.join(30)
        deadline = time.monotonic() + 180
        while True:
            with sqlite3.connect(database) as conn:
                open_jobs = conn.execute(
                    "select count(*) from jobs where status not in "
                    "('succeeded', 'failed', 'cancelled')"
                ).fetchone()[0]
            if open_jobs == 0:
                break
            assert time.monotonic() < deadline, f"{open_jobs} jobs never finished"
            time.sleep(0.2)
    finally:
        stop.set()
        server.terminate()

    with sqlite3.connect(database) as conn:
        rows = dict(conn.execute("select id, status from jobs").fetchall())
        results = Counter(r for (r,) in conn.execute("select job_id from job_results"))
        succeeded_events = Counter(
            r for (r,) in conn.execute("select job_id from job_events where status = 'succeeded'")
        )
        integrity = conn.execute("pragma integrity_check").fetchone()[0]
    lost = [job_id for job_id in accepted if job_id not in rows]
    duplicated = [job_id for job_id, n in results.items() if n > 1]
    print(
        f"\nchaos: {len(accepted)} jobs accepted, kills {dict(kills)}, lost {len(lost)}, "
        f"duplicated results {len(duplicated)}, statuses {Counter(rows.values())}"
    )
    assert len(accepted) > 50
    assert sum(kills.values()) == ROUNDS
    assert lost == []
    assert duplicated == []
    assert set(Counter(rows.values())) <= {"succeeded", "failed"}
    assert set(results) == {job_id for job_id, status in rows.items() if status == "succeeded"}
    assert set(succeeded_events.values()) <= {1}
    assert integrity == "ok"
