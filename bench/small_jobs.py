"""4. Small jobs end to end: jobs/s from the first submit over HTTP to the last `succeeded`,
against huey (SqliteHuey, 2 worker processes) doing the same pandas work."""

from __future__ import annotations

import importlib
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    PYTHON,
    Proc,
    Row,
    base_env,
    fmt_rates,
    jobsvc_server,
    profiler,
    progress,
    run_wrk,
    sqlite_query,
    workspace,
)

N = 2000
ROUNDS = 3
CONCURRENCY = 32
WORKERS = 2
TIMEOUT = 120.0
POLL = 0.02
# Two worker processes; an idle worker polls after 10 ms, backing off to at most 50 ms.
CONSUMER_OPTIONS = ["-w", str(WORKERS), "-k", "process", "-d", "0.01", "-m", "0.05", "-b", "1.1"]


def records(i: int) -> list[dict[str, Any]]:
    return [{"a": i + k, "b": (i + k) * 0.5, "c": k % 3} for k in range(5)]


def submit_all(url: str, n: int, first: int = 0) -> float:
    """Submit ``n`` small summarize jobs over ``CONCURRENCY`` connections (wrk, so that the
    load generator's own CPU is small beside the server's on two cores); wall seconds."""
    started = time.perf_counter()
    result = run_wrk(
        url, "post_jobs.lua", seconds=TIMEOUT, connections=CONCURRENCY, args=[str(n), str(first)]
    )
    elapsed = time.perf_counter() - started
    if len(result.ids) != n or result.count(202) != n:
        raise RuntimeError(f"{n} submits gave {result.statuses}, errors {result.errors}")
    return elapsed


def wait_until(count: Any, n: int, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while (done := count()) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: only {done} of {n} done after {TIMEOUT:g} s")
        time.sleep(POLL)


def jobsvc_rate(tmp: Path, round_number: int) -> tuple[float, float]:
    db = tmp / "jobs.db"

    def succeeded() -> int:
        return int(sqlite_query(db, "select count(*) from jobs where status = 'succeeded'")[0][0])

    with jobsvc_server(tmp, workers=WORKERS) as server:
        submit_all(server.url, 50, first=N)  # warm-up
        wait_until(succeeded, 50, "jobsvc warm-up")
        started = time.perf_counter()
        with profiler(server.pid, f"small-jobs-{round_number}", 5):
            submit_seconds = submit_all(server.url, N)
            wait_until(succeeded, 50 + N, "jobsvc")
        elapsed = time.perf_counter() - started
        failed = sqlite_query(db, "select count(*) from jobs where status != 'succeeded'")[0][0]
        if failed:
            raise RuntimeError(f"{failed} jobsvc jobs did not succeed")
    return N / elapsed, N / submit_seconds


def huey_rate(tmp: Path) -> tuple[float, float]:
    db = tmp / "huey.db"
    os.environ["BENCH_HUEY_DB"] = str(db)
    # Imported afresh, so that it opens this run's database (``from bench import huey_peer``
    # would find the first run's module on the package).
    sys.modules.pop("bench.huey_peer", None)
    huey_peer = importlib.import_module("bench.huey_peer")

    consumer = Proc(
        "huey",
        [PYTHON, "-m", "huey.bin.huey_consumer", "bench.huey_peer.huey", *CONSUMER_OPTIONS],
        base_env(BENCH_HUEY_DB=str(db)),
        tmp,
        ready_path=None,
        ready_text="Huey consumer started",
    )
    with consumer:
        warm = [huey_peer.summarize(records(i)) for i in range(50)]
        for result in warm:
            result.get(blocking=True, timeout=60)
        started = time.perf_counter()
        for i in range(N):
            huey_peer.summarize(records(i))
        enqueue_seconds = time.perf_counter() - started
        wait_until(huey_peer.huey.result_count, N, "huey")
        elapsed = time.perf_counter() - started
    return N / elapsed, N / enqueue_seconds


def run() -> list[Row]:
    progress(f"4. small jobs end to end: {N} summarize jobs, against huey, {ROUNDS} rounds")
    ours, theirs, submit_rates, enqueue_rates = [], [], [], []
    # In turn, so that both meet the same moods of a shared machine; the median of each.
    for round_number in range(ROUNDS):
        with workspace("small-jobs") as tmp:
            rate, submit_rate = jobsvc_rate(tmp, round_number)
        progress(f"  jobsvc: {rate:,.0f} jobs/s end to end (submits {submit_rate:,.0f}/s)")
        with workspace("huey") as tmp:
            peer_rate, enqueue_rate = huey_rate(tmp)
        progress(f"  huey: {peer_rate:,.0f} jobs/s end to end (enqueues {enqueue_rate:,.0f}/s)")
        ours.append(rate)
        submit_rates.append(submit_rate)
        theirs.append(peer_rate)
        enqueue_rates.append(enqueue_rate)
    ours_median, theirs_median = statistics.median(ours), statistics.median(theirs)
    submit_rate, enqueue_rate = statistics.median(submit_rates), statistics.median(enqueue_rates)
    ratio = ours_median / theirs_median
    notes = [
        f"N = {N} jobs of 5 records each; jobsvc: `summarize` submitted over HTTP with "
        f"{CONCURRENCY} concurrent connections (wrk, `bench/lua/post_jobs.lua`) at "
        f"{submit_rate:,.0f}/s, "
        f"`JOBSVC_WORKERS={WORKERS}`; huey: SqliteHuey (`fsync=True`, i.e. synchronous=FULL, "
        f"like jobsvc), `-k process -w {WORKERS}`, polling from 10 ms backing off to 50 ms, "
        f"jobsvc's `summarize_frame(DataFrame(records))`, enqueued in-process (no HTTP) at "
        f"{enqueue_rate:,.0f}/s. Both: time from the first submit until the store counts N "
        f"finished jobs (polled every {POLL * 1000:.0f} ms), after a 50-job warm-up. "
        f"{ROUNDS} rounds, a jobsvc run and a huey run in turn, the median of each: jobsvc "
        f"{fmt_rates(ours)}, huey {fmt_rates(theirs)} jobs/s.",
    ]
    return [
        Row(
            "4. Small jobs end to end (jobs/s)",
            f"{ours_median:,.0f}",
            f"huey {theirs_median:,.0f}",
            f"{ratio:.2f}x",
            ">= 1.0x",
            ratio >= 1.0,
            notes,
        )
    ]
