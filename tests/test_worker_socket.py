"""The service's side of one worker process: framed messages over its socket, both ways."""

from __future__ import annotations

import asyncio
import gc
import io
import multiprocessing
import signal
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from jobsvc import formats
from jobsvc.records import AttemptError, ResultData
from jobsvc.worker import WorkerProcess, process_context
from jobsvc.worker_process import RunRequest
from tests.conftest import make_settings


@pytest.fixture
async def worker(tmp_path: Path) -> AsyncIterator[WorkerProcess]:
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}")
    with ThreadPoolExecutor(max_workers=1) as threads:
        process = await WorkerProcess.start(process_context(), settings, threads)
        try:
            yield process
        finally:
            await process.close()
    assert not process.alive


def request(task: str, frame: pd.DataFrame, **params: object) -> RunRequest:
    data = formats.frame_to_parquet(frame)
    return RunRequest("job", 1, task, dict(params), "parquet", data)


async def test_messages_larger_than_a_write_arrive_whole_and_in_order(
    worker: WorkerProcess,
) -> None:
    # Random floats do not compress: several MiB each way, more than one write's piece.
    frame = pd.DataFrame({"x": np.random.default_rng(0).random(600_000)})
    progress: list[float] = []

    async def on_progress(value: float) -> None:
        progress.append(value)

    for factor in (2, 3):  # the same socket stays in step from one job to the next
        outcome = await worker.run(request("double", frame, factor=factor), on_progress, 60)
        assert isinstance(outcome, ResultData)
        result = pd.read_parquet(io.BytesIO(outcome.data or b""))
        pd.testing.assert_series_equal(result["x"], frame["x"] * factor)
    napped = await worker.run(request("nap", frame.head(3), seconds=0.5), on_progress, 60)
    assert napped == ResultData("json", value={"rows": 3, "slept": 0.5})
    assert progress[-1] == 1.0


async def test_a_task_past_its_timeout_has_its_process_killed_and_collected(
    worker: WorkerProcess,
) -> None:
    outcome = await worker.run(request("nap", pd.DataFrame(), seconds=30), _ignore, 0.3)
    assert isinstance(outcome, AttemptError)
    assert outcome.type == "TimeoutError"
    assert not worker.alive  # already collected, so the dispatcher replaces it at once


async def test_a_process_that_dies_mid_job_is_worker_lost(worker: WorkerProcess) -> None:
    outcome = await worker.run(request("die", pd.DataFrame()), _ignore, 60)
    message = "its worker process was killed by SIGKILL (out of memory?)"
    assert outcome == AttemptError("WorkerLost", message)


async def _ignore(value: float) -> None:
    pass


async def test_a_start_cancelled_midway_leaves_no_socket_or_process(tmp_path: Path) -> None:
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}")
    earlier = set(multiprocessing.active_children())  # other tests' processes are not this one's
    with ThreadPoolExecutor(max_workers=1) as threads:
        starting = asyncio.create_task(WorkerProcess.start(process_context(), settings, threads))
        await asyncio.sleep(0)  # the start is under way in the thread
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
    # The start has finished now (the pool is shut): its process is no one's and is killed by a
    # callback on the loop, so the loop must run while we wait for that.
    started = [child for child in multiprocessing.active_children() if child not in earlier]
    assert len(started) == 1
    await asyncio.to_thread(started[0].join, 10)  # in a thread: the loop must run meanwhile
    assert started[0].exitcode == -signal.SIGKILL
    gc.collect()  # an unclosed socket would warn here, and warnings are errors
