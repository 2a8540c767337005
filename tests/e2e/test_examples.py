"""The two example apps side by side: a restart in the middle of a job loses it with
BackgroundTasks and finishes it with DurableBackgroundTasks."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.live_server import LiveApp

RECORDS = [{"a": 1.0, "b": 2.0}, {"a": 3.0, "b": 4.0}]


def wait_until(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_restart_mid_job_loses_the_plain_task_and_finishes_the_durable_one(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    env = {"EXAMPLE_OUT_DIR": str(out), "EXAMPLE_WORK_SECONDS": "2"}
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"

    def apps() -> tuple[LiveApp, LiveApp]:
        plain = LiveApp(
            "examples.background_tasks_app:app",
            database_url,
            tmp_path / "plain.log",
            ready_path="/docs",
            **env,
        )
        durable = LiveApp(
            "examples.durable_app:app",
            database_url,
            tmp_path / "durable.log",
            ready_path="/jobs",
            **env,
        )
        return plain, durable

    plain, durable = apps()
    with plain, durable:
        for app, batch in ((plain, "plain"), (durable, "durable")):
            response = httpx.post(f"{app.url}/process/", params={"batch": batch}, json=RECORDS)
            assert response.status_code == 200, response.text
        job_id = response.json()["job_id"]
        wait_until(
            lambda: httpx.get(f"{durable.url}/jobs/{job_id}").json()["status"] == "running",
            30,
            "the durable job to start",
        )
        plain.kill9()
        durable.kill9()

    plain, durable = apps()
    with plain, durable:
        wait_until(
            lambda: httpx.get(f"{durable.url}/jobs/{job_id}").json()["status"] == "succeeded",
            60,
            "the durable job to finish after the restart",
        )
        job = httpx.get(f"{durable.url}/jobs/{job_id}").json()
        assert job["attempts"] == 2  # the cut-off attempt counts
    assert (out / "durable.json").exists()
    # The plain app's work died with its process, and nothing knows it was ever asked for.
    assert not (out / "plain.json").exists()
