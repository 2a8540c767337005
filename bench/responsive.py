"""2. A free event loop: p99 of ``GET /jobs/{id}`` at a fixed modest rate while two CPU-heavy
pandas jobs run, and while large JSON bodies are submitted, against the same service idle; the
seed pattern under the same heavy jobs."""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from bench.common import (
    Proc,
    Row,
    WrkResult,
    jobsvc_server,
    profiler,
    progress,
    run_wrk,
    submit_small,
    uvicorn_app,
    wait_for_status,
    workspace,
)

CONNECTIONS = 10
PAUSE_MS = 50  # 10 connections x one request per ~50 ms: about 200 req/s
SECONDS = 10.0  # ~2,000 requests each, so the p99 is the 20th-slowest, not the 10th
BIG_JSON_RECORDS = 100_000  # a 4.4 MB JSON body
HEAVY_SECONDS = 25.0  # each heavy job outlasts the warm-up and the measurement


def paced_reads(proc: Proc, ids: list[str], label: str) -> WrkResult:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as file:
        file.write("\n".join(ids) + "\n")
    try:
        args = {"connections": CONNECTIONS, "pgid": proc.pid, "args": [file.name, str(PAUSE_MS)]}
        run_wrk(proc.url, "get_paced.lua", seconds=1.0, **args)
        with profiler(proc.pid, f"responsive-{proc.name}-{label}", SECONDS):
            result = run_wrk(proc.url, "get_paced.lua", seconds=SECONDS, **args)
    finally:
        Path(file.name).unlink()
    progress(
        f"  {proc.name} {label}: {result.rate:,.0f} req/s, p50 "
        f"{result.latency_us['p50'] / 1000:.1f} ms, p99 {result.latency_us['p99'] / 1000:.1f} ms,"
        f" max {result.latency_us['max'] / 1000:.1f} ms, statuses {result.statuses}"
    )
    return result


def start_heavy(client: httpx.Client) -> list[str]:
    ids = []
    for _ in range(2):
        body = {"task": "churn", "params": {"seconds": HEAVY_SECONDS}, "data": [{"a": 1}]}
        response = client.post("/jobs", json=body)
        response.raise_for_status()
        ids.append(response.json()["id"])
    return ids


@contextmanager
def large_json_submits(url: str) -> Iterator[list[int]]:
    """Submit 100,000-record JSON bodies back to back from a thread, until the block ends;
    yields the running count of them."""
    records = [{"a": i, "b": i * 0.5, "c": f"name {i % 100}"} for i in range(BIG_JSON_RECORDS)]
    body = json.dumps({"task": "summarize", "data": records}).encode()
    count = [0, len(body)]
    stop = threading.Event()

    def submit() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while not stop.is_set():
                response = client.post(
                    "/jobs", content=body, headers={"Content-Type": "application/json"}
                )
                response.raise_for_status()
                count[0] += 1

    thread = threading.Thread(target=submit, daemon=True)
    thread.start()
    try:
        yield count
    finally:
        stop.set()
        thread.join()


def run() -> list[Row]:
    progress("2. a free event loop: GET /jobs/{id} at ~200 req/s, idle and with 2 heavy jobs")
    with (
        workspace("responsive") as tmp,
        jobsvc_server(tmp, workers=2) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        ids = [submit_small(client)["id"] for _ in range(20)]
        for job_id in ids:
            wait_for_status(client, job_id, {"succeeded"}, timeout=60)
        idle = paced_reads(server, ids, "idle")
        with large_json_submits(server.url) as big_json:
            during_json = paced_reads(server, ids, "large JSON submits")
        heavy_ids = start_heavy(client)
        for job_id in heavy_ids:
            wait_for_status(client, job_id, {"running"}, timeout=30, every=0.02)
        busy = paced_reads(server, ids, "2 heavy jobs")
        still = [client.get(f"/jobs/{job_id}").json()["status"] for job_id in heavy_ids]
    with (
        workspace("responsive-seed") as tmp,
        uvicorn_app(tmp, "bench.seed_app:app", "seed") as seed,
        httpx.Client(base_url=seed.url, timeout=30) as client,
    ):
        seed_ids = [submit_small(client)["id"] for _ in range(20)]
        time.sleep(0.5)
        seed_idle = paced_reads(seed, seed_ids, "idle")
        start_heavy(client)
        time.sleep(0.2)
        seed_busy = paced_reads(seed, seed_ids, "2 heavy jobs")

    p99_idle = idle.latency_us["p99"] / 1000
    p99_busy = busy.latency_us["p99"] / 1000
    ratio = p99_busy / p99_idle
    seed_ratio = seed_busy.latency_us["p99"] / seed_idle.latency_us["p99"]
    notes = [
        f"wrk, {CONNECTIONS} connections each pausing ~{PAUSE_MS} ms between requests, "
        f"{SECONDS:g} s: {idle.rate:,.0f} req/s idle, {busy.rate:,.0f} req/s busy. Heavy job: "
        f"`bench.heavy_tasks.churn` (pandas group-by/sort on 200k rows, {HEAVY_SECONDS:g} s), "
        f"two at once, `JOBSVC_WORKERS=2`; both were still {'/'.join(still)} at the end.",
        f"jobsvc p50 idle/busy {idle.latency_us['p50'] / 1000:.1f}/"
        f"{busy.latency_us['p50'] / 1000:.1f} ms, max {idle.latency_us['max'] / 1000:.1f}/"
        f"{busy.latency_us['max'] / 1000:.1f} ms.",
        f"Seed pattern (the same two jobs in `BackgroundTasks`): p99 "
        f"{seed_idle.latency_us['p99'] / 1000:.1f} ms idle, "
        f"{seed_busy.latency_us['p99'] / 1000:.1f} ms busy ({seed_ratio:.1f}x), "
        f"{seed_busy.rate:,.0f} req/s served busy.",
    ]
    p99_json = during_json.latency_us["p99"] / 1000
    json_ratio = p99_json / p99_idle
    json_notes = [
        f"Meanwhile a client submitted {big_json[1] / 1e6:.1f} MB JSON bodies "
        f"({BIG_JSON_RECORDS:,} records each) back to back: {big_json[0]} in {SECONDS:g} s. "
        "A body over 64 KiB is parsed and checked in another process (an idle worker, else a "
        "converter), not on the event loop.",
    ]
    return [
        Row(
            "2. p99 `GET /jobs/{id}` during large JSON submits",
            f"{p99_json:.1f} ms",
            f"idle {p99_idle:.1f} ms",
            f"{json_ratio:.2f}x idle",
            "(context)",
            None,
            json_notes,
        ),
        Row(
            "2. p99 `GET /jobs/{id}` with 2 heavy jobs running",
            f"{p99_busy:.1f} ms",
            f"idle {p99_idle:.1f} ms; seed busy {seed_busy.latency_us['p99'] / 1000:.1f} ms",
            f"{ratio:.2f}x idle",
            "<= 2x idle",
            ratio <= 2.0,
            notes,
        ),
    ]
