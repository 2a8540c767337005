"""The executor: one attempt on a real worker process, framed messages over its socket both
ways, the timeout, a process that dies, and the runner's own fault (through its hook)."""

from __future__ import annotations

import asyncio
import gc
import io
import multiprocessing
import signal
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from jobsvc import formats
from jobsvc.lifecycle import AttemptError, Outcome, ResultData
from jobsvc.processes import process_context
from jobsvc.runner.attempt import Attempt
from jobsvc.runner.executor import Executor
from jobsvc.runner.faults import FaultHooks
from jobsvc.runner.pool import WorkerProcess
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


def attempt_of(
    worker: WorkerProcess, task: str, frame: pd.DataFrame, timeout: float = 60, **params: object
) -> Attempt:
    job = SimpleNamespace(id="job", attempts=1, task=task, params=dict(params))
    job.timeout_seconds = timeout
    stored = SimpleNamespace(format="parquet", data=formats.frame_to_parquet(frame), path=None)
    return Attempt(job, stored, process=worker)


def executor(progress: list[float] | None = None, faults: FaultHooks | None = None) -> Executor:
    def on_progress(_attempt: Attempt, value: float) -> None:
        if progress is not None:
            progress.append(value)

    return Executor(None, on_progress, faults or FaultHooks())


async def test_messages_larger_than_a_write_arrive_whole_and_in_order(
    worker: WorkerProcess,
) -> None:
    # Random floats do not compress: several MiB each way, more than one write's piece.
    frame = pd.DataFrame({"x": np.random.default_rng(0).random(600_000)})
    progress: list[float] = []
    run = executor(progress).run
    for factor in (2, 3):  # the same socket stays in step from one job to the next
        outcome = await run(attempt_of(worker, "double", frame, factor=factor))
        assert outcome.result is not None
        result = pd.read_parquet(io.BytesIO(outcome.result.data or b""))
        pd.testing.assert_series_equal(result["x"], frame["x"] * factor)
    napped = await run(attempt_of(worker, "nap", frame.head(3), seconds=0.5))
    assert napped == Outcome(result=ResultData("json", value={"rows": 3, "slept": 0.5}))
    assert progress[-1] == 1.0


async def test_a_task_past_its_timeout_has_its_process_killed_and_collected(
    worker: WorkerProcess,
) -> None:
    outcome = await executor().run(attempt_of(worker, "nap", pd.DataFrame(), 0.3, seconds=30))
    assert outcome.error is not None
    assert outcome.error.type == "TimeoutError"
    assert not outcome.interrupted
    assert not worker.alive  # already collected, so the pool replaces it at once


async def test_a_process_that_dies_mid_job_is_worker_lost(worker: WorkerProcess) -> None:
    outcome = await executor().run(attempt_of(worker, "die", pd.DataFrame()))
    message = "its worker process was killed by SIGKILL (out of memory?)"
    assert outcome == Outcome(error=AttemptError("WorkerLost", message))


async def test_a_process_killed_by_the_runners_stop_is_handed_back(
    worker: WorkerProcess,
) -> None:
    attempt = attempt_of(worker, "nap", pd.DataFrame(), seconds=30)
    running = asyncio.create_task(executor().run(attempt))
    await asyncio.sleep(0.2)
    attempt.interrupted = True
    attempt.kill()
    outcome = await running
    assert outcome.interrupted
    assert outcome.error is not None
    assert outcome.error.type == "WorkerLost"


@pytest.mark.parametrize("raised", ["KeyboardInterrupt", "SystemExit"])
async def test_a_task_that_raises_an_exit_ends_its_process_not_as_its_error(
    worker: WorkerProcess, raised: str
) -> None:
    outcome = await executor().run(attempt_of(worker, "raise_base", pd.DataFrame(), kind=raised))
    assert outcome.error is not None
    assert outcome.error.type == "WorkerLost"
    assert "the task raised SystemExit or KeyboardInterrupt" in outcome.error.message
    assert not worker.alive


async def test_a_fault_of_the_runner_is_a_runner_error_and_leaves_the_process_as_it_was(
    worker: WorkerProcess,
) -> None:
    def broken(job_id: str) -> None:
        raise RuntimeError(f"no request for {job_id}")

    run = executor(faults=FaultHooks(before_request=broken)).run
    outcome = await run(attempt_of(worker, "double", pd.DataFrame({"a": [1]})))
    assert outcome.error is not None
    assert outcome.error.type == "RunnerError"
    assert "no request for job" in outcome.error.message
    # Nothing was sent: the same process runs the next attempt.
    assert (await executor().run(attempt_of(worker, "double", pd.DataFrame({"a": [1]})))).result


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
