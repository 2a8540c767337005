"""1. Durable accept: ``POST /jobs`` at synchronous=FULL against a bare endpoint that stores
nothing and against the seed pattern (``BackgroundTasks`` running pandas)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.common import (
    SMALL_BODY,
    Proc,
    Row,
    WrkResult,
    fmt_rates,
    jobsvc_server,
    profiler,
    progress,
    run_wrk,
    sqlite_query,
    uvicorn_app,
    workspace,
)

CONNECTIONS = 64
SECONDS = 5.0
WARMUP_SECONDS = 1.0
ROUNDS = 3


def post_jobs(proc: Proc, seconds: float) -> WrkResult:
    return run_wrk(
        proc.url + "/jobs",
        "post.lua",
        seconds=seconds,
        connections=CONNECTIONS,
        pgid=proc.pid,
        args=[json.dumps(SMALL_BODY)],
    )


def warm_up(proc: Proc) -> WrkResult:
    return post_jobs(proc, WARMUP_SECONDS)


def measure(proc: Proc, round_number: int) -> WrkResult:
    with profiler(proc.pid, f"accept-{proc.name}-{round_number}", SECONDS):
        measured = post_jobs(proc, SECONDS)
    progress(
        f"  {proc.name}: {measured.rate:,.0f} req/s, "
        f"p99 {measured.latency_us['p99'] / 1000:.1f} ms, statuses {measured.statuses}, "
        f"wrk used {measured.wrk_cpu / measured.seconds:.0%} of a core, "
        f"the server's processes {measured.target_cpu / measured.seconds:.0%}"
    )
    return measured


@contextmanager
def paused(proc: Proc) -> Iterator[None]:
    """``proc``'s processes stopped (SIGSTOP) while another server is measured: jobsvc would
    otherwise go on running the jobs it accepted, on the other server's cores."""
    os.killpg(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(proc.pid, signal.SIGCONT)


def median_run(runs: list[WrkResult]) -> WrkResult:
    """The median run by rate (a single run on a shared 2-core machine varies by a fifth)."""
    return sorted(runs, key=lambda run: run.rate)[len(runs) // 2]


def rates(runs: list[WrkResult]) -> str:
    return fmt_rates(run.rate for run in runs)


def stored_ids(db_path: Path) -> set[str]:
    return {row[0] for row in sqlite_query(db_path, "select id from jobs")}


def run() -> list[Row]:
    progress("1. durable accept: POST /jobs, 64 connections")
    with workspace("seed") as tmp, uvicorn_app(tmp, "bench.seed_app:app", "seed") as seed:
        warm_up(seed)
        seed_run = measure(seed, 0)
    with workspace("bare") as bare_tmp, workspace("accept") as tmp:
        server = jobsvc_server(tmp, workers=1)
        with uvicorn_app(bare_tmp, "bench.bare_app:app", "bare") as bare, server:
            with paused(server):
                warm_up(bare)
            with paused(bare):
                jobsvc_runs = [warm_up(server)]
            bare_runs = []
            # In turn, so that both meet the same moods of a shared machine.
            for round_number in range(ROUNDS):
                with paused(server):
                    bare_runs.append(measure(bare, round_number))
                with paused(bare):
                    jobsvc_runs.append(measure(server, round_number))
        # Stopped: every committed row is in the file, and nothing writes any more.
        stored = stored_ids(tmp / "jobs.db")
    bare_run, jobsvc_run = median_run(bare_runs), median_run(jobsvc_runs[1:])
    accepted = [job_id for run in jobsvc_runs for job_id in run.ids]
    missing = [job_id for job_id in accepted if job_id not in stored]
    non_202 = {
        status: n for run in jobsvc_runs for status, n in run.statuses.items() if status != 202
    }

    ratio = jobsvc_run.rate / bare_run.rate
    notes = [
        f"Load: wrk, 1 thread, {CONNECTIONS} connections, {ROUNDS} runs of {SECONDS:g} s "
        f"after a {WARMUP_SECONDS:g} s warm-up, the median run reported (jobsvc "
        f"{rates(jobsvc_runs[1:])} req/s; bare {rates(bare_runs)}), a bare run and a jobsvc run "
        "in turn, the other server's processes stopped (SIGSTOP) meanwhile; every server is "
        "one uvicorn process with its access log off. jobsvc: `JOBSVC_WORKERS=1`, SQLite "
        "`synchronous=FULL`; the jobs it accepts run meanwhile.",
        f"The generator is not the limit: against the bare endpoint wrk used "
        f"{bare_run.wrk_cpu / bare_run.seconds:.0%} of one core while the server used "
        f"{bare_run.target_cpu / bare_run.seconds:.0%} (jobsvc's process group: "
        f"{jobsvc_run.target_cpu / jobsvc_run.seconds:.0%} of the 2 cores' 200%).",
        f"Seed pattern (`BackgroundTasks` + pandas `describe`): {seed_run.rate:,.0f} req/s, "
        f"{seed_run.rate / bare_run.rate:.2f}x bare; jobsvc is "
        f"{jobsvc_run.rate / seed_run.rate:.1f}x the seed pattern.",
        f"jobsvc p50/p99 latency {jobsvc_run.latency_us['p50'] / 1000:.1f}/"
        f"{jobsvc_run.latency_us['p99'] / 1000:.1f} ms; bare "
        f"{bare_run.latency_us['p50'] / 1000:.1f}/{bare_run.latency_us['p99'] / 1000:.1f} ms.",
    ]
    socket_errors = sum(run.socket_errors for run in jobsvc_runs)
    durability = (
        f"{len(accepted):,} ids answered 202 (every run, warm-up included); "
        f"{len(stored):,} rows stored; {len(missing)} missing"
        + (f"; other statuses {non_202}" if non_202 else "")
        + f"; socket errors {socket_errors}. Rows beyond the 202s are requests wrk had in "
        "flight when it stopped (committed, answer not read)."
    )
    return [
        Row(
            "1. Durable accept, `POST /jobs` (req/s)",
            f"{jobsvc_run.rate:,.0f}",
            f"bare {bare_run.rate:,.0f}; seed {seed_run.rate:,.0f}",
            f"{ratio:.2f}x bare",
            ">= 0.5x bare",
            ratio >= 0.5,
            notes,
        ),
        Row(
            "1. Every 202 is in the database",
            f"{len(missing)} missing of {len(accepted):,}",
            f"{len(stored):,} rows",
            "",
            "0 missing",
            not missing and not non_202,
            [durability],
        ),
    ]
