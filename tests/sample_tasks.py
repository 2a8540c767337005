"""Tasks the tests submit (imported through JOBSVC_TASK_MODULES, as a user's module would be)."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import pandas as pd

from jobsvc import report_progress, task


@task(name="double")
def double(df: pd.DataFrame, factor: int = 2) -> pd.DataFrame:
    return df * factor


@task(name="boom", retry_delay=0.01)
def boom(df: pd.DataFrame, message: str = "boom") -> pd.DataFrame:
    raise ValueError(message)


@task(name="nap")
def nap(df: pd.DataFrame, seconds: float = 0.2, steps: int = 4) -> dict[str, Any]:
    """Sleeps in steps, reporting progress: a stand-in for a long job."""
    for step in range(steps):
        time.sleep(seconds / steps)
        report_progress((step + 1) / steps)
    return {"rows": len(df), "slept": seconds}


@task(name="wait_for_file")
def wait_for_file(df: pd.DataFrame, path: str, limit: float = 60.0) -> dict[str, Any]:
    """Runs until ``path`` exists: lets a test hold a job in `running` for exactly as long
    as it needs, with no sleeps on the test's side."""
    deadline = time.monotonic() + limit
    report_progress(0.5)
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)
    return {"rows": len(df)}


@task(name="big_after_file")
def big_after_file(df: pd.DataFrame, path: str, rows: int = 100_000) -> pd.DataFrame:
    """Waits (silently: no progress report) until ``path`` exists, then returns a DataFrame
    large enough to be stored as a result file."""
    deadline = time.monotonic() + 60
    while not Path(path).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return pd.DataFrame({"n": range(rows), "half": [i / 2 for i in range(rows)]})


@task(name="niceness")
def niceness(df: pd.DataFrame) -> dict[str, Any]:
    return {"nice": os.nice(0)}


@task(name="die", retry_delay=0.01)
def die(df: pd.DataFrame) -> None:
    """Kills its own worker process, as a segfault or the OOM killer would."""
    os.kill(os.getpid(), signal.SIGKILL)


@task(name="die_once", retry_delay=0.01)
def die_once(df: pd.DataFrame, marker: str) -> dict[str, Any]:
    """Kills its worker on the first attempt only (the marker file remembers)."""
    if not Path(marker).exists():
        Path(marker).write_text("died")
        os.kill(os.getpid(), signal.SIGKILL)
    return {"survived": True}


@task(name="fail_times", retry_delay=0.01)
def fail_times(df: pd.DataFrame, counter: str, failures: int = 1) -> dict[str, Any]:
    """Fails its first ``failures`` attempts, then succeeds."""
    path = Path(counter)
    seen = int(path.read_text()) if path.exists() else 0
    path.write_text(str(seen + 1))
    if seen < failures:
        raise RuntimeError(f"failure {seen + 1} of {failures}")
    return {"attempts_seen": seen + 1}


@task(name="slow", timeout=0.5, retry_delay=0.01)
def slow(df: pd.DataFrame) -> None:
    time.sleep(30)


@task(name="nothing")
def nothing(df: pd.DataFrame) -> None:
    return None


@task(name="not_a_result")
def not_a_result(df: pd.DataFrame) -> Any:
    return [1, 2, 3]


@task(name="texts")
def texts(df: pd.DataFrame) -> pd.DataFrame:
    """Returns cells a spreadsheet would treat as formulas."""
    return pd.DataFrame(
        {"cell": ["=1+1", "+cmd", "-2+3", "@SUM(A1)", "\tx", "plain"], "n": [1, 2, 3, 4, 5, -6]}
    )


@task(name="hog", retry_delay=0.01)
def hog(df: pd.DataFrame, megabytes: int = 2048) -> dict[str, Any]:
    """Allocates far more than a capped worker may have."""
    block = bytearray(megabytes * 1024 * 1024)
    return {"allocated": len(block)}


@task(name="chatty")
def chatty(df: pd.DataFrame, words: str = "hello") -> None:
    """Logs a line from inside the worker process."""
    logging.getLogger("tests.chatty").warning("the task says %s", words)


@task(name="counted_wait", retry_delay=0.01)
def counted_wait(df: pd.DataFrame, marker: str, path: str, limit: float = 60.0) -> dict[str, Any]:
    """Appends a ``started <pid>`` line to ``marker`` (one per execution), waits until ``path``
    exists, then appends ``finished <pid>`` and returns: a test counts the executions and knows
    the moment the task has returned its outcome."""
    with open(marker, "a") as out:
        out.write(f"started {os.getpid()}\n")
    report_progress(0.5)
    deadline = time.monotonic() + limit
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)
    with open(marker, "a") as out:
        out.write(f"finished {os.getpid()}\n")
    return {"rows": len(df)}


@task(name="raise_base", retry_delay=0.01)
def raise_base(df: pd.DataFrame, kind: str, marker: str | None = None) -> dict[str, Any]:
    """Raises ``KeyboardInterrupt`` or ``SystemExit`` (``kind``): on every attempt, or, given a
    ``marker`` file, only on the first (the marker remembers)."""
    if marker is not None and Path(marker).exists():
        return {"survived": True}
    if marker is not None:
        Path(marker).write_text("raised")
    if kind == "KeyboardInterrupt":
        raise KeyboardInterrupt
    if kind == "SystemExit":
        raise SystemExit(3)
    raise ValueError(f"unknown kind {kind!r}")
