"""Tasks only the benchmarks submit (``JOBSVC_TASK_MODULES=bench.heavy_tasks``)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd

from jobsvc import task


def churn_frame(seconds: float) -> int:
    """CPU-bound pandas work for about ``seconds``: a group-by with a Python function per group
    (which holds the GIL, as most real pandas code does somewhere) and a sort, on 200k rows."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "key": rng.integers(0, 1000, 200_000),
            "x": rng.random(200_000),
            "y": rng.random(200_000),
        }
    )
    rounds = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        spread = frame.groupby("key")["x"].apply(lambda s: s.max() - s.min())
        spread.sort_values()
        frame.sort_values(["x", "y"])
        rounds += 1
    return rounds


@task(name="churn", max_attempts=1, timeout=600)
def churn(df: pd.DataFrame, seconds: float = 5.0) -> dict[str, Any]:
    return {"rounds": churn_frame(seconds)}


@task(name="hold", max_attempts=1, timeout=600)
def hold(df: pd.DataFrame, seconds: float = 30.0) -> None:
    """Keeps a worker busy without using the CPU."""
    time.sleep(seconds)
