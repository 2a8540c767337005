"""6. Status reads under load: 500 req/s of ``GET /jobs/{id}`` while ~50 small jobs/s are
submitted and run; p99, and no 5xx or "database is locked" anywhere."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import httpx

from bench.common import (
    Row,
    jobsvc_server,
    profiler,
    progress,
    run_wrk,
    submit_small,
    wait_for_status,
    workspace,
)

CONNECTIONS = 50
PAUSE_MS = 95  # 50 connections x one request per ~95 ms plus the answer: about 500 req/s
SECONDS = 5.0
SUBMITS_PER_SECOND = 50


class Submitter(threading.Thread):
    """Submits small jobs on a fixed schedule (one every 1/rate s, not waiting for the answer)
    until stopped; counts statuses and "database is locked" answers."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.statuses: Counter[int] = Counter()
        self.locked = 0
        self.stop = threading.Event()

    def run(self) -> None:
        asyncio.run(self._submit())

    async def _submit(self) -> None:
        interval = 1 / SUBMITS_PER_SECOND
        body = {"task": "summarize", "data": [{"a": 1, "b": 2.5}, {"a": 2, "b": 3.5}]}
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as client:

            async def one() -> None:
                response = await client.post("/jobs", json=body)
                self.statuses[response.status_code] += 1
                self.locked += "database is locked" in response.text

            pending: set[asyncio.Task[None]] = set()
            next_at = time.monotonic()
            while not self.stop.is_set():
                task = asyncio.create_task(one())
                pending.add(task)
                task.add_done_callback(pending.discard)
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            await asyncio.gather(*pending)


def run() -> list[Row]:
    progress("6. status reads under load: ~500 GET/s while ~50 jobs/s are submitted and run")
    with workspace("status-reads") as tmp, jobsvc_server(tmp, workers=1) as server:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            ids = [submit_small(client)["id"] for _ in range(50)]
            wait_for_status(client, ids[-1], {"succeeded"}, timeout=60)
        ids_file = tmp / "ids.txt"
        ids_file.write_text("\n".join(ids) + "\n")
        submitter = Submitter(server.url)
        submitter.start()
        try:
            args = {
                "connections": CONNECTIONS,
                "pgid": server.pid,
                "args": [str(ids_file), str(PAUSE_MS)],
            }
            run_wrk(server.url, "get_paced.lua", seconds=1.0, **args)
            with profiler(server.pid, "status-reads", SECONDS):
                reads = run_wrk(server.url, "get_paced.lua", seconds=SECONDS, **args)
        finally:
            submitter.stop.set()
            submitter.join(30)
        log = server.log()
    server_log_locked = log.count("database is locked")
    submit_5xx = sum(n for status, n in submitter.statuses.items() if status >= 500)
    errors = reads.server_errors + submit_5xx + submitter.locked + server_log_locked
    p99 = reads.latency_us["p99"] / 1000
    progress(
        f"  {reads.rate:,.0f} GET/s, p50 {reads.latency_us['p50'] / 1000:.1f} ms, "
        f"p99 {p99:.1f} ms, GET statuses {reads.statuses}, submits {dict(submitter.statuses)}"
    )
    submitted = sum(submitter.statuses.values())
    notes = [
        f"wrk, {CONNECTIONS} connections each pausing ~{PAUSE_MS} ms: {reads.rate:,.0f} GET/s "
        f"for {SECONDS:g} s (after 1 s of warm-up), p50 {reads.latency_us['p50'] / 1000:.1f} ms,"
        f" max {reads.latency_us['max'] / 1000:.1f} ms; meanwhile {submitted} `summarize` "
        f"jobs submitted on a schedule of {SUBMITS_PER_SECOND}/s and run by "
        "`JOBSVC_WORKERS=1`.",
        f"GET statuses {dict(reads.statuses)}, socket errors {reads.socket_errors}; submit "
        f"statuses {dict(submitter.statuses)}; 'database is locked' in answers "
        f"{submitter.locked}, in the server log {server_log_locked}.",
    ]
    return [
        Row(
            "6. Status reads under load (p99 of `GET /jobs/{id}`)",
            f"{p99:.1f} ms",
            "",
            "",
            "<= 25 ms",
            p99 <= 25.0,
            notes,
        ),
        Row(
            '6. 5xx / "database is locked" during it',
            str(errors),
            "",
            "",
            "0",
            errors == 0,
            [],
        ),
    ]
