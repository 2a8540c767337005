"""The contract's stops, on real ``jobsvc serve`` and ``jobsvc worker`` processes.

SIGTERM or SIGINT, to the main process or to its whole process group (``systemctl stop``,
Ctrl-C), gives running jobs ``JOBSVC_SHUTDOWN_GRACE`` seconds, then hands them back to the
queue: not counted, no error. A second signal stops at once, and what ran is recovered as after
a crash. A task raising ``KeyboardInterrupt`` or ``SystemExit`` is never that task's error.

The process under test is the only one running jobs. The jobs are submitted and inspected
through a separate API-only app (``tests.api_only_app``, no workers), which stays up while the
process under test stops and starts again.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.live_jobs import (
    get_events,
    get_job,
    signal_pending,
    submit,
    wait_all_terminal,
    wait_exit,
    wait_group_empty,
    wait_running_task,
    wait_terminal,
    wait_until,
)
from tests.live_server import LiveApp, LiveServer, LiveWorker

pytestmark = pytest.mark.slow

GRACE = 1.0
# How long after the grace a stopping process may take to exit, on a loaded two-core machine.
EXIT_MARGIN = 6.0
# A second signal stops at once: well under the (long) grace.
AT_ONCE = 5.0
LONG_GRACE = 60.0

COMMANDS = ["serve", "worker"]
SIGNALS = [signal.SIGINT, signal.SIGTERM]
TARGETS = ["main", "group"]


@pytest.fixture
def database_url(tmp_path: Path, sqlite_template: Path) -> str:
    path = tmp_path / "jobsvc.db"
    shutil.copyfile(sqlite_template, path)
    return f"sqlite+aiosqlite:///{path}"


@pytest.fixture
def api(database_url: str, tmp_path: Path) -> Iterator[httpx.Client]:
    """The job API without workers, for submitting and looking while the runner comes and goes."""
    app = LiveApp("tests.api_only_app:app", database_url, tmp_path / "api.log", ready_path="/jobs")
    with app, httpx.Client(base_url=app.url, timeout=10) as http:
        yield http


def runner(command: str, database_url: str, log: Path, **env: str) -> LiveServer:
    """The process under test (not started): ``jobsvc serve`` or ``jobsvc worker``, in its own
    session, so its pid is also its process group's id."""
    kind = LiveServer if command == "serve" else LiveWorker
    return kind(database_url, log, **env)


def send(process: LiveServer, signum: signal.Signals, target: str) -> None:
    if target == "group":
        os.killpg(process.pid, signum)  # what systemctl stop and Ctrl-C do
    else:
        os.kill(process.pid, signum)


def wait_signal_taken(process: LiveServer, signum: signal.Signals) -> None:
    """Until the process has taken the signal: no longer pending at the kernel, and for
    ``serve``, its listening socket closed (uvicorn's shutdown has begun). Only then is a second
    signal a second one, not merged into the first."""
    wait_until(
        lambda: not signal_pending(process.pid, signum), 10, f"{signum.name} taken by the process"
    )
    if process.command == "serve":

        def refused() -> bool:
            try:
                httpx.get(process.url + "/healthz", timeout=0.5)
            except httpx.ConnectError:
                return True
            except httpx.TransportError:
                return False
            return False

        wait_until(refused, 15, "serve to stop listening after the signal", interval=0.05)


def exits_after_stop(process: LiveServer, within: float) -> float:
    """Wait for the process to exit; then nothing of its group may be left. Returns seconds."""
    assert process.process is not None
    try:
        seconds = wait_exit(process.process, within)
    except AssertionError as error:
        raise AssertionError(f"{error}\n--- its log ---\n{process.log()[-4000:]}") from None
    wait_group_empty(process.pid)
    return seconds


def statuses(events: list[dict[str, Any]]) -> list[str]:
    return [event["status"] for event in events]


def error_types(events: list[dict[str, Any]]) -> list[str | None]:
    return [event["error"] and event["error"]["type"] for event in events]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: s.name)
@pytest.mark.parametrize("command", COMMANDS)
def test_a_stop_hands_the_running_job_back_uncounted_and_a_restart_runs_it(
    command: str,
    signum: signal.Signals,
    target: str,
    database_url: str,
    api: httpx.Client,
    tmp_path: Path,
) -> None:
    release = tmp_path / "release"
    job_id = submit(api, "wait_for_file", {"path": str(release)}, max_attempts=1)

    first = runner(command, database_url, tmp_path / "first.log", JOBSVC_SHUTDOWN_GRACE=str(GRACE))
    with first:
        wait_running_task(api, job_id)
        send(first, signum, target)
        exits_after_stop(first, GRACE + EXIT_MARGIN)

    job = get_job(api, job_id)
    events = get_events(api, job_id)
    log = first.log()[-4000:]
    assert (job["status"], job["attempts"], job["error"]) == ("queued", 0, None), log
    assert statuses(events) == ["queued", "running", "queued"], (events, log)
    assert error_types(events) == [None, None, None], (events, log)

    release.touch()
    again = runner(command, database_url, tmp_path / "second.log", JOBSVC_SHUTDOWN_GRACE=str(GRACE))
    with again:
        done = wait_terminal(api, job_id, timeout=60)
    assert (done["status"], done["attempts"], done["error"]) == ("succeeded", 1, None)
    assert statuses(get_events(api, job_id))[-2:] == ["running", "succeeded"]


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: s.name)
@pytest.mark.parametrize("command", COMMANDS)
def test_a_job_that_finishes_within_the_grace_succeeds(
    command: str,
    signum: signal.Signals,
    database_url: str,
    api: httpx.Client,
    tmp_path: Path,
) -> None:
    """The signal to the whole group (the worker process gets it too); the job's task ends
    after the stop has begun, within the grace: its outcome is kept, as any other."""
    grace = 10.0
    release = tmp_path / "release"
    job_id = submit(api, "wait_for_file", {"path": str(release)}, max_attempts=1)

    process = runner(command, database_url, tmp_path / "run.log", JOBSVC_SHUTDOWN_GRACE=str(grace))
    with process:
        wait_running_task(api, job_id)
        send(process, signum, "group")
        wait_signal_taken(process, signum)
        release.touch()
        exits_after_stop(process, grace + EXIT_MARGIN)

    done = get_job(api, job_id)
    events = get_events(api, job_id)
    log = process.log()[-4000:]
    assert (done["status"], done["attempts"], done["error"]) == ("succeeded", 1, None), log
    assert statuses(events) == ["queued", "running", "succeeded"], (events, log)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("command", COMMANDS)
def test_a_second_signal_stops_at_once_and_the_job_is_recovered_as_after_a_crash(
    command: str,
    target: str,
    database_url: str,
    api: httpx.Client,
    tmp_path: Path,
) -> None:
    release = tmp_path / "release"
    job_id = submit(api, "wait_for_file", {"path": str(release)}, max_attempts=2)
    env = {"JOBSVC_SHUTDOWN_GRACE": str(LONG_GRACE), "JOBSVC_LEASE_SECONDS": "5"}

    first = runner(command, database_url, tmp_path / "first.log", **env)
    with first:
        wait_running_task(api, job_id)
        send(first, signal.SIGINT, target)
        wait_signal_taken(first, signal.SIGINT)
        send(first, signal.SIGINT, target)
        exits_after_stop(first, AT_ONCE)

    release.touch()
    with runner(command, database_url, tmp_path / "second.log", **env):
        done = wait_terminal(api, job_id, timeout=60)
    events = get_events(api, job_id)
    assert (done["status"], done["attempts"], done["error"]) == ("succeeded", 2, None)
    assert "WorkerLost" in error_types(events), events
    assert statuses(events)[-2:] == ["running", "succeeded"], events


@pytest.mark.parametrize("kind", ["KeyboardInterrupt", "SystemExit"])
def test_a_task_raising_keyboard_interrupt_or_system_exit_is_recovered_as_a_crash(
    kind: str, database_url: str, tmp_path: Path
) -> None:
    """Neither is the task's error: its worker process ends, the attempt is lost as in a
    crash (``WorkerLost``) and retried, and the service goes on."""
    server = LiveServer(database_url, tmp_path / "server.log", JOBSVC_LEASE_SECONDS="5")
    with server, httpx.Client(base_url=server.url, timeout=10) as http:
        always = submit(http, "raise_base", {"kind": kind}, max_attempts=2)
        once = submit(
            http, "raise_base", {"kind": kind, "marker": str(tmp_path / "raised")}, max_attempts=2
        )
        jobs = wait_all_terminal(http, [always, once], timeout=90)
        always_events = get_events(http, always)
        once_events = get_events(http, once)
        assert server.process is not None
        assert server.process.poll() is None, server.log()
        health = http.get("/healthz")
        assert health.status_code == 200, health.text

    log = server.log()[-4000:]
    assert jobs[always]["status"] == "failed", (jobs[always], log)
    assert jobs[always]["attempts"] == 2, jobs[always]
    assert jobs[always]["error"]["type"] == "WorkerLost", jobs[always]
    assert {t for t in error_types(always_events) if t} == {"WorkerLost"}, always_events

    assert (jobs[once]["status"], jobs[once]["attempts"], jobs[once]["error"]) == (
        "succeeded",
        2,
        None,
    ), (jobs[once], log)
    assert {t for t in error_types(once_events) if t} == {"WorkerLost"}, once_events


@pytest.fixture
def pg_api(pg_database_url: str, tmp_path: Path) -> Iterator[httpx.Client]:
    app = LiveApp(
        "tests.api_only_app:app", pg_database_url, tmp_path / "api.log", ready_path="/jobs"
    )
    with app, httpx.Client(base_url=app.url, timeout=10) as http:
        yield http


@pytest.mark.parametrize("command", COMMANDS)
def test_a_stop_on_postgresql_hands_the_running_job_back_uncounted(
    command: str, pg_database_url: str, pg_api: httpx.Client, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    job_id = submit(pg_api, "wait_for_file", {"path": str(release)}, max_attempts=1)
    grace = {"JOBSVC_SHUTDOWN_GRACE": str(GRACE)}
    first = runner(command, pg_database_url, tmp_path / "first.log", **grace)
    with first:
        wait_running_task(pg_api, job_id)
        send(first, signal.SIGTERM, "group")
        exits_after_stop(first, GRACE + EXIT_MARGIN)
    job = get_job(pg_api, job_id)
    assert (job["status"], job["attempts"], job["error"]) == ("queued", 0, None), first.log()
    release.touch()
    with runner(command, pg_database_url, tmp_path / "second.log", **grace):
        done = wait_terminal(pg_api, job_id, timeout=60)
    assert (done["status"], done["attempts"], done["error"]) == ("succeeded", 1, None)
