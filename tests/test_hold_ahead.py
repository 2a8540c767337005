"""A worker process's next job is claimed while its current one runs, after a short job
(``Dispatcher._run``): what that held job looks like, and what happens to it when it is
cancelled, when its process dies, and when it starts. Both backends, one worker process.

Each test first occupies the worker with a job that waits for a file, queues the jobs it is
about, and then lets the first one end: the outcome's transaction claims the next job to run
now and one more to hold, in priority order.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from jobsvc import worker
from tests.conftest import event_statuses, submit, wait_for_status

RECORDS = [{"a": 1}, {"a": 2}]


@pytest.fixture(autouse=True)
def _every_job_is_short(monkeypatch: pytest.MonkeyPatch) -> None:
    # The holder below runs for as long as the test takes to queue its jobs: on a slow
    # machine that could pass the threshold, and nothing would be held.
    monkeypatch.setattr(worker, "HOLD_AHEAD_BELOW_SECONDS", 60.0)


async def job(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    response = await client.get(f"/jobs/{job_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def queue_behind_holder(
    client: httpx.AsyncClient, tmp_path: Path, *jobs: tuple[str, dict[str, Any]]
) -> list[str]:
    """Hold the worker, queue ``jobs`` (task, body) in that order, then free the worker."""
    release = tmp_path / "release-holder"
    holder = await submit(client, "wait_for_file", params={"path": str(release)})
    await wait_for_status(client, holder["id"], "running")
    ids = [
        (await submit(client, task, priority=rank, **body))["id"]
        for rank, (task, body) in enumerate(jobs)
    ]
    release.touch()
    assert (await wait_for_status(client, holder["id"]))["status"] == "succeeded"
    return ids


def when(value: str | None) -> datetime:
    assert value is not None
    return datetime.fromisoformat(value)


async def test_a_held_job_starts_when_the_one_before_it_ends(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    first, second = await queue_behind_holder(
        client,
        tmp_path,
        ("nap", {"data": RECORDS, "params": {"seconds": 0.2}}),
        ("double", {"data": RECORDS}),
    )
    done_first = await wait_for_status(client, first)
    done_second = await wait_for_status(client, second)
    assert (done_first["status"], done_second["status"]) == ("succeeded", "succeeded")
    assert (done_first["attempts"], done_second["attempts"]) == (1, 1)
    # Claimed when the holder ended, but its start time is when it began to run.
    assert when(done_second["started_at"]) >= when(done_first["finished_at"])
    assert await event_statuses(client, second) == ["queued", "running", "succeeded"]


async def test_a_held_job_cancelled_before_its_turn_never_runs(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    release = tmp_path / "release-running"
    marker = tmp_path / "held-job-ran"
    running, held = await queue_behind_holder(
        client,
        tmp_path,
        ("wait_for_file", {"data": RECORDS, "params": {"path": str(release)}}),
        ("die_once", {"data": RECORDS, "params": {"marker": str(marker)}}),
    )
    await wait_for_status(client, running, "running")
    assert (await job(client, held))["status"] == "running"  # held: claimed, not started
    response = await client.post(f"/jobs/{held}/cancel")
    assert response.status_code == 200, response.text
    release.touch()
    # Cancelling the held job did not stop the process running the one before it.
    done = await wait_for_status(client, running)
    assert (done["status"], done["attempts"], done["error"]) == ("succeeded", 1, None)
    after = await submit(client, "double", data=RECORDS)
    assert (await wait_for_status(client, after["id"]))["status"] == "succeeded"
    assert not marker.exists()
    assert (await job(client, held))["status"] == "cancelled"
    assert await event_statuses(client, held) == ["queued", "running", "cancelled"]


async def test_a_held_job_whose_process_dies_goes_back_uncounted(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    doomed, held = await queue_behind_holder(
        client,
        tmp_path,
        ("die", {"data": RECORDS, "max_attempts": 1}),
        ("double", {"data": RECORDS}),
    )
    lost = await wait_for_status(client, doomed)
    assert (lost["status"], lost["error"]["type"]) == ("failed", "WorkerLost")
    done = await wait_for_status(client, held)
    assert (done["status"], done["attempts"], done["error"]) == ("succeeded", 1, None)
    history = await event_statuses(client, held)
    assert history == ["queued", "running", "queued", "running", "succeeded"]
