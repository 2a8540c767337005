"""3. Big data: a 1,000,000-row CSV uploaded as the body, filter -> group_by -> sort, the
result downloaded as CSV; against a plain pandas script doing the same from the same file."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd

from bench.common import (
    PYTHON,
    RESULTS,
    MemorySampler,
    Row,
    jobsvc_server,
    profiler,
    progress,
    workspace,
)

ROWS = 1_000_000
CSV = RESULTS / "big.csv"
STEPS = [
    {"op": "filter", "column": "x", "cmp": ">", "value": 0.25},
    {
        "op": "group_by",
        "by": ["key"],
        "aggregations": {"y": ["sum", "mean"], "n": ["max"]},
    },
    {"op": "sort", "by": ["y_sum"], "descending": True},
]
RUNS = 7  # the best of seven, for jobsvc and for the plain script alike
TIMEOUT = 120.0


def make_csv() -> Path:
    """The input, made once (seeded, so every run reads the same bytes)."""
    if CSV.exists():
        return CSV
    progress(f"  writing {ROWS:,} rows to {CSV}")
    rng = np.random.default_rng(42)
    frame = pd.DataFrame(
        {
            "key": np.char.add("key_", rng.integers(0, 1000, ROWS).astype(str)),
            "x": rng.random(ROWS).round(6),
            "y": rng.normal(100, 15, ROWS).round(4),
            "n": rng.integers(0, 10_000, ROWS),
            "z": rng.random(ROWS).round(6),
        }
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    partial = CSV.with_suffix(".partial")
    frame.to_csv(partial, index=False)
    partial.rename(CSV)
    return CSV


def through_jobsvc(client: httpx.Client, source: Path, target: Path) -> float:
    """Upload (streamed from the file), wait for success, download the CSV: wall seconds."""
    params = {"task": "pipeline", "params": json.dumps({"steps": STEPS})}
    started = time.perf_counter()
    with source.open("rb") as file:
        response = client.post(
            "/jobs", params=params, content=file, headers={"Content-Type": "text/csv"}
        )
    response.raise_for_status()
    job_id = response.json()["id"]
    deadline = time.monotonic() + TIMEOUT
    while (job := client.get(f"/jobs/{job_id}").json())["status"] != "succeeded":
        if job["status"] in ("failed", "cancelled") or time.monotonic() > deadline:
            raise RuntimeError(f"pipeline job ended {job['status']}: {job['error']}")
        time.sleep(0.01)
    with client.stream("GET", f"/jobs/{job_id}/result", headers={"Accept": "text/csv"}) as result:
        result.raise_for_status()
        with target.open("wb") as out:
            for chunk in result.iter_bytes():
                out.write(chunk)
    return time.perf_counter() - started


def plain(source: Path, target: Path) -> tuple[float, int, int]:
    """The plain script's seconds, its peak RSS and its RSS with pandas imported (bytes)."""
    output = subprocess.run(
        [PYTHON, "-m", "bench.plain_pipeline", str(source), str(target)],
        check=True,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout
    elapsed, peak_rss, imported_rss = output.split()[-3:]
    return float(elapsed), int(peak_rss), int(imported_rss)


def same_result(ours: Path, theirs: Path) -> str | None:
    """None when equal; else what differs."""
    a, b = pd.read_csv(ours), pd.read_csv(theirs)
    try:
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-9, check_dtype=False)
    except AssertionError as error:
        return str(error).splitlines()[0]
    return None


def seconds(times: list[float]) -> str:
    return ", ".join(f"{t:.2f}" for t in times) + " s"


def run() -> list[Row]:
    progress("3. big data: a 1M-row CSV through pipeline, against plain pandas")
    source = make_csv()
    size = source.stat().st_size
    with workspace("bigdata") as tmp:
        with (
            jobsvc_server(tmp, workers=1) as server,
            httpx.Client(base_url=server.url, timeout=httpx.Timeout(30.0, read=TIMEOUT)) as client,
        ):
            small = tmp / "small.csv"
            pd.read_csv(source, nrows=1000).to_csv(small, index=False)
            through_jobsvc(client, small, tmp / "warm.csv")  # workers warm
            with MemorySampler(server.pid) as memory:
                idle_rss = memory.first_rss
                times, plain_times, plain_memory = [], [], []
                # Alternated, so that both meet the same moods of a shared machine.
                for run_number in range(RUNS):
                    elapsed, peak_rss, imported_rss = plain(source, tmp / "plain.csv")
                    plain_times.append(elapsed)
                    plain_memory.append((peak_rss, imported_rss))
                    with profiler(server.pid, f"bigdata-{run_number}", 3):
                        times.append(through_jobsvc(client, source, tmp / "jobsvc.csv"))
        progress(f"  plain pandas: {seconds(plain_times)}")
        progress(f"  jobsvc: {seconds(times)}")
        difference = same_result(tmp / "jobsvc.csv", tmp / "plain.csv")
        result_rows = len(pd.read_csv(tmp / "plain.csv"))
    ours, theirs = min(times), min(plain_times)
    ratio = ours / theirs
    rss_ratio = memory.peak_rss / size
    plain_peak, plain_imported = max(plain_memory)  # the run that peaked highest
    progress(
        f"  peak RSS {memory.peak_rss / 2**20:,.0f} MiB (idle {idle_rss / 2**20:,.0f} MiB), "
        f"PSS {memory.peak_pss / 2**20:,.0f} MiB; results {difference or 'equal'}"
    )
    notes = [
        f"{ROWS:,} rows x 5 columns, {size / 1e6:.1f} MB; steps filter x > 0.25 -> group_by key "
        f"(y sum, mean; n max) -> sort y_sum desc, {result_rows:,} result rows. jobsvc: upload "
        "streamed from the file to the 202, status polled every 10 ms, CSV result downloaded "
        "to a file (`JOBSVC_WORKERS=1`). Plain pandas: a fresh process per run, timed from "
        "after its imports to the CSV written (import time excluded on both sides: jobsvc's "
        f"workers are warm). Best of {RUNS} each, a plain run and a jobsvc run in turn; "
        f"jobsvc {seconds(times)}, plain {seconds(plain_times)}.",
        "Results "
        + ("equal (pandas, rtol 1e-9)." if difference is None else f"DIFFER: {difference}"),
        f"Memory: the sum of VmRSS over the service's process group (API, fork server, "
        f"worker, and a converter if one was started) sampled every 20 ms: idle "
        f"{idle_rss / 2**20:,.0f} MiB, peak "
        f"{memory.peak_rss / 2**20:,.0f} MiB, i.e. {(memory.peak_rss - idle_rss) / size:.1f}x "
        f"the CSV above idle. Summed VmRSS counts a shared page in every process mapping it; "
        f"the peak of the summed PSS (shared pages split among their processes) was "
        f"{memory.peak_pss / 2**20:,.0f} MiB ({memory.peak_pss / size:.1f}x). The plain "
        f"pandas script, one process doing only this, peaked at "
        f"{plain_peak / 2**20:,.0f} MiB ({plain_peak / size:.1f}x the CSV; the most of its "
        f"{RUNS} runs), {plain_imported / 2**20:,.0f} MiB of it before reading the file "
        "(Python and pandas loaded).",
    ]
    return [
        Row(
            "3. Big data: 1M-row CSV upload -> pipeline -> CSV (wall s)",
            f"{ours:.2f} s",
            f"plain pandas {theirs:.2f} s",
            f"{ratio:.2f}x",
            "<= 1.3x",
            ratio <= 1.3 and difference is None,
            notes,
        ),
        Row(
            "3. Peak RSS of the service's processes",
            f"{memory.peak_rss / 2**20:,.0f} MiB",
            f"CSV {size / 2**20:,.0f} MiB; plain pandas {plain_peak / 2**20:,.0f} MiB "
            f"({plain_peak / size:.1f}x)",
            f"{rss_ratio:.1f}x",
            "<= 6x",
            rss_ratio <= 6.0,
            [],
        ),
    ]
