"""5. Submit-to-start latency on an idle service: one job at a time, ``started_at`` minus
``created_at`` as the API reports them (both taken on the server)."""

from __future__ import annotations

import time
from datetime import datetime

import httpx

from bench.common import (
    Row,
    fmt_ms,
    jobsvc_server,
    percentile,
    profiler,
    progress,
    submit_small,
    wait_for_status,
    workspace,
)

N = 200
BUDGET_SECONDS = 90.0


def start_latencies(url: str, n: int, poll: float = 0.005) -> list[float]:
    """Submit, wait for the job to finish, next; the seconds from created to started."""
    latencies = []
    deadline = time.monotonic() + BUDGET_SECONDS
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(n):
            if time.monotonic() > deadline:
                break
            job = submit_small(client)
            job = wait_for_status(client, job["id"], {"succeeded"}, timeout=30, every=poll)
            started = datetime.fromisoformat(job["started_at"])
            created = datetime.fromisoformat(job["created_at"])
            latencies.append((started - created).total_seconds())
    return latencies


def run() -> list[Row]:
    progress(f"5. submit-to-start latency, idle service, {N} jobs one at a time")
    with workspace("latency") as tmp, jobsvc_server(tmp, workers=1) as server:
        start_latencies(server.url, 10)  # warm-up
        with profiler(server.pid, "latency", 5):
            latencies = start_latencies(server.url, N)
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    progress(f"  p50 {fmt_ms(p50)}, p99 {fmt_ms(p99)}, max {fmt_ms(max(latencies))}")
    notes = [
        f"{len(latencies)} `summarize` jobs, each submitted once the previous one succeeded "
        f"(status polled every 5 ms), `JOBSVC_WORKERS=1`, after 10 warm-up jobs; max "
        f"{fmt_ms(max(latencies))}. For context, not measured in this run: huey's was p50 "
        "5 ms, p99 16 ms on an earlier 2-core machine.",
    ]
    return [
        Row(
            "5. Submit-to-start latency, idle (p50)",
            fmt_ms(p50),
            "",
            "",
            "<= 5 ms",
            p50 <= 0.005,
            notes,
        ),
        Row(
            "5. Submit-to-start latency, idle (p99)",
            fmt_ms(p99),
            "",
            "",
            "<= 20 ms",
            p99 <= 0.020,
            [],
        ),
    ]
