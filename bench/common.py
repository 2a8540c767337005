"""What every benchmark shares: processes under test, the load generator, samplers, figures.

Every server runs in its own session, so its process group holds it and every process it
starts (fork server, workers); ``Proc.stop`` sends SIGTERM and then SIGKILLs whatever is left
of the group, and ``stop_all`` (run at exit) does the same for anything a failure left behind.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tests.live_server import free_port, group_members  # the same process plumbing

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
RESULTS = BENCH / "results"
PYTHON = sys.executable
POSTGRES_ADMIN_URL = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432")
SMALL_BODY = {"task": "summarize", "data": [{"a": 1}, {"a": 2}]}
START_TIMEOUT = 60.0


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- figures -------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the results table."""

    benchmark: str
    jobsvc: str
    reference: str
    ratio: str
    target: str
    met: bool | None  # None: not applicable (skipped, or context only)
    notes: list[str] = field(default_factory=list)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (``p`` in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def fmt_rates(rates: Iterable[float]) -> str:
    """``2,083, 2,207, 1,660``: each run's rate, for a note."""
    return ", ".join(f"{rate:,.0f}" for rate in rates)


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


# --- processes -----------------------------------------------------------------------------

_LIVE: list[Proc] = []


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU time of a process group's live members."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in group_members(pgid):
        with contextlib.suppress(OSError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBSVC_", "PROCRASTINATE_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env.update(extra)
    return env


class Proc:
    """A process under test, in its own session; ready when ``ready_path`` answers 200
    (or, without one, when ``ready_text`` appears in its log)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        workdir: Path,
        port: int | None = None,
        ready_path: str | None = "/healthz",
        ready_text: str | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.workdir = workdir
        self.port = port
        self.url = f"http://127.0.0.1:{port}" if port else ""
        self.ready_path = ready_path
        self.ready_text = ready_text
        self.log_path = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> Proc:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _LIVE.append(self)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}:\n{self.log()}"
                )
            if self._ready():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} not ready within {START_TIMEOUT:g} s:\n{self.log()}")

    def _ready(self) -> bool:
        if self.ready_text is not None:
            return self.ready_text in self.log()
        try:
            return httpx.get(self.url + (self.ready_path or "/"), timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL to the whole group; returns when no member is left."""
        if self.process is None:
            return
        pgid = self.process.pid
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                progress(f"{self.name} ignored SIGTERM for {timeout:g} s; killing its group")
        deadline = time.monotonic() + 5.0
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if group_members(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        self.process.wait()
        deadline = time.monotonic() + 10.0
        while (left := group_members(pgid)) and time.monotonic() < deadline:
            time.sleep(0.02)
        if left:
            raise RuntimeError(f"processes {left} of {self.name} survived SIGKILL")
        with contextlib.suppress(ValueError):
            _LIVE.remove(self)

    def __enter__(self) -> Proc:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def stop_all() -> None:
    for proc in list(_LIVE):
        with contextlib.suppress(Exception):
            proc.stop(timeout=5.0)


atexit.register(stop_all)


def sqlite_url(workdir: Path) -> str:
    return f"sqlite+aiosqlite:///{workdir / 'jobs.db'}"


def jobsvc_server(
    workdir: Path,
    *,
    workers: int,
    name: str = "jobsvc",
    database_url: str | None = None,
    **env: str,
) -> Proc:
    """``jobsvc serve`` (uvicorn, one process for the API) on 127.0.0.1, access log off."""
    port = free_port()
    settings = {
        "JOBSVC_DATABASE_URL": database_url or sqlite_url(workdir),
        "JOBSVC_WORKERS": str(workers),
        "JOBSVC_TASK_MODULES": "bench.heavy_tasks",
        "JOBSVC_SHUTDOWN_GRACE": "2",
        **env,
    }
    argv = [PYTHON, "-m", "jobsvc.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    return Proc(name, [*argv, "--log-level", "warning"], base_env(**settings), workdir, port)


def jobsvc_worker(workdir: Path, *, workers: int, database_url: str, **env: str) -> Proc:
    settings = {
        "JOBSVC_DATABASE_URL": database_url,
        "JOBSVC_WORKERS": str(workers),
        "JOBSVC_TASK_MODULES": "bench.heavy_tasks",
        "JOBSVC_SHUTDOWN_GRACE": "2",
        **env,
    }
    return Proc(
        "jobsvc-worker",
        [PYTHON, "-m", "jobsvc.cli", "worker"],
        base_env(**settings),
        workdir,
        ready_path=None,
        ready_text="worker ready",
    )


def uvicorn_app(workdir: Path, target: str, name: str) -> Proc:
    """Any ASGI app under uvicorn, served like ``jobsvc serve``: one process, access log off."""
    port = free_port()
    argv = [PYTHON, "-m", "uvicorn", target, "--host", "127.0.0.1", "--port", str(port)]
    return Proc(name, [*argv, "--log-level", "warning"], base_env(), workdir, port)


@contextlib.contextmanager
def workspace(name: str) -> Iterator[Path]:
    """A fresh temporary directory; on a failure its logs are kept in bench/results/failed-*."""
    with tempfile.TemporaryDirectory(prefix=f"jobsvc-bench-{name}-") as tmp:
        try:
            yield Path(tmp)
        except BaseException:
            kept = RESULTS / f"failed-{name}"
            kept.mkdir(parents=True, exist_ok=True)
            for log in Path(tmp).glob("*.log"):
                shutil.copy(log, kept / log.name)
            progress(f"  {name} failed; its logs are in {kept}")
            raise


def sqlite_query(path: Path, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """A read on the service's SQLite file (WAL: it never blocks the service's writer)."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as db:
        return db.execute(sql, args).fetchall()


# --- samplers ------------------------------------------------------------------------------


class MemorySampler:
    """Peak of the summed VmRSS (and PSS) of a process group's members, sampled every 20 ms."""

    def __init__(self, pgid: int, interval: float = 0.02) -> None:
        self.pgid = pgid
        self.interval = interval
        self.peak_rss = 0
        self.peak_pss = 0
        self.first_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> tuple[int, int]:
        rss = pss = 0
        for pid in group_members(self.pgid):
            with contextlib.suppress(OSError, ValueError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1]) * 1024
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
        return rss, pss

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, pss = self.sample()
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_pss = max(self.peak_pss, pss)
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self.first_rss = self.sample()[0]
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


# --- the load generator (wrk) --------------------------------------------------------------


@dataclass
class WrkResult:
    requests: int
    seconds: float
    statuses: dict[int, int]
    errors: dict[str, int]
    latency_us: dict[str, float]
    ids: list[str]
    wrk_cpu: float  # CPU seconds wrk itself used
    target_cpu: float  # CPU seconds the process group under test used

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def count(self, status: int) -> int:
        return self.statuses.get(status, 0)

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)

    @property
    def socket_errors(self) -> int:
        return sum(self.errors.values()) - self.errors.get("status", 0)


def run_wrk(
    url: str,
    script: str,
    *,
    seconds: float,
    connections: int,
    pgid: int | None = None,
    args: list[str] | None = None,
    threads: int = 1,
) -> WrkResult:
    """Run wrk with one of the Lua scripts in bench/lua; it reports through its ``done()``."""
    with tempfile.TemporaryDirectory(prefix="jobsvc-bench-wrk-") as tmp:
        out = Path(tmp) / "out.json"
        ids = Path(tmp) / "ids.txt"
        argv = [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{seconds:g}s",
            "--timeout",
            "10s",
            "-s",
            str(BENCH / "lua" / script),
            url,
            "--",
            *(args or []),
        ]
        finished = Path(tmp) / "finished"
        env = {
            **os.environ,
            "BENCH_FINISHED": str(finished),
            "BENCH_OUT": str(out),
            "BENCH_IDS_OUT": str(ids),
            "BENCH_LUA_DIR": str(BENCH / "lua"),
        }
        cpu_before = group_cpu_seconds(pgid) if pgid else 0.0
        with (Path(tmp) / "wrk.log").open("wb") as log:
            process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                _, status, usage = _wait_for_wrk(process, finished)
            except BaseException:
                process.kill()
                process.wait()
                raise
            process.returncode = os.waitstatus_to_exitcode(status)
        target_cpu = group_cpu_seconds(pgid) - cpu_before if pgid else 0.0
        if process.returncode != 0 or not out.exists():
            log_text = (Path(tmp) / "wrk.log").read_text(errors="replace")
            raise RuntimeError(f"wrk failed ({process.returncode}):\n{log_text}")
        report = json.loads(out.read_text())
        return WrkResult(
            requests=int(report["requests"]),
            seconds=report["duration_us"] / 1e6,
            statuses={int(k): int(v) for k, v in report["statuses"].items()},
            errors={k: int(v) for k, v in report["errors"].items()},
            latency_us={k: float(v) for k, v in report["latency_us"].items()},
            ids=ids.read_text().split() if ids.exists() else [],
            wrk_cpu=usage.ru_utime + usage.ru_stime,
            target_cpu=target_cpu,
        )


def _wait_for_wrk(process: subprocess.Popen[bytes], finished: Path) -> tuple[int, int, Any]:
    """Wait for wrk to exit. wrk always runs for its whole duration, even when a script's
    threads stop early; a script that is done writes $BENCH_FINISHED, and wrk is then
    interrupted (SIGINT: it still reports)."""
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            return pid, status, usage
        if finished.exists():
            process.send_signal(signal.SIGINT)
            return os.wait4(process.pid, 0)
        time.sleep(0.002)


def submit_small(client: httpx.Client, records: int = 2, task: str = "summarize") -> dict[str, Any]:
    body = {"task": task, "data": [{"a": i, "b": i * 0.5} for i in range(records)]}
    response = client.post("/jobs", json=body)
    response.raise_for_status()
    job: dict[str, Any] = response.json()
    return job


def wait_for_status(
    client: httpx.Client, job_id: str, statuses: set[str], timeout: float, every: float = 0.05
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = client.get(f"/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {job['status']} after {timeout:g} s")
        time.sleep(every)


@contextlib.contextmanager
def profiler(pid: int, name: str, seconds: float) -> Iterator[None]:
    """With ``BENCH_PROFILE=1``: py-spy samples ``pid`` (and its children) while the block runs,
    into bench/results/profile-<name>.txt (collapsed stacks; ``python -m bench.profile_top``)."""
    if os.environ.get("BENCH_PROFILE") != "1":
        yield
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"profile-{name}.txt"
    beside = Path(PYTHON).parent / "py-spy"  # installed into the same environment
    spy = str(beside) if beside.exists() else "py-spy"
    argv = [spy, "record", "--pid", str(pid), "--subprocesses", "-d", f"{math.ceil(seconds)}"]
    process = subprocess.Popen(
        [*argv, "-f", "raw", "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    time.sleep(0.3)  # attached before the measurement starts
    try:
        yield
    finally:
        try:
            process.wait(seconds + 10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        progress(f"  profile written to {out}")
