"""The ``jobsvc`` command, run as a user runs it: a subprocess against a real server."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from jobsvc import migrate
from tests.conftest import TERMINAL
from tests.live_server import LiveServer, free_port, server_env


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    # One server for the module: every test works on jobs of its own, found by id.
    directory = tmp_path_factory.mktemp("cli")
    with LiveServer(
        f"sqlite+aiosqlite:///{directory / 'jobsvc.db'}", directory / "server.log"
    ) as live:
        yield live


@pytest.fixture
def csv_file(tmp_path: Path) -> Path:
    path = tmp_path / "numbers.csv"
    path.write_text("k,v\na,1\nb,2\nc,3\n")
    return path


def jobsvc(
    *args: str, url: str, env: dict[str, str] | None = None, columns: int = 200
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "jobsvc.cli", *args]
    # By default wide enough that no table folds what the tests look for.
    environment = {
        **(env or server_env("sqlite+aiosqlite:///unused.db")),
        "COLUMNS": str(columns),
    }
    environment["JOBSVC_URL"] = url
    return subprocess.run(
        command, env=environment, capture_output=True, text=True, timeout=90, check=False
    )


def assert_one_line_failure(result: subprocess.CompletedProcess[str], *words: str) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0]
    return lines[0]


def wait_terminal(server: LiveServer, job_id: str, timeout: float = 30.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, object] = httpx.get(f"{server.url}/jobs/{job_id}").json()
        if job["status"] in TERMINAL:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} is still {job['status']}")


def test_submit_csv_and_wait_shows_the_result(server: LiveServer, csv_file: Path) -> None:
    result = jobsvc(
        "submit",
        str(csv_file),
        "--task",
        "double",
        "--param",
        "factor=3",
        "--wait",
        url=server.url,
    )

    assert result.returncode == 0, result.stderr
    job_id = result.stdout.splitlines()[0]
    assert "succeeded" in result.stdout
    assert "3 rows" in result.stdout
    assert "aaa" in result.stdout  # pandas repeats strings: "a" * 3
    assert "9" in result.stdout
    assert httpx.get(f"{server.url}/jobs/{job_id}").json()["status"] == "succeeded"


def test_submit_pipeline_steps_as_a_json_param(server: LiveServer, csv_file: Path) -> None:
    steps = [
        {"op": "filter", "column": "v", "cmp": ">", "value": 1},
        {"op": "sort", "by": ["v"], "descending": True},
    ]

    result = jobsvc(
        "submit",
        str(csv_file),
        "--task",
        "pipeline",
        "--param",
        f"steps={json.dumps(steps)}",
        "--wait",
        url=server.url,
    )

    assert result.returncode == 0, result.stderr
    assert "2 rows" in result.stdout
    table = result.stdout[result.stdout.index("2 rows") :]
    assert table.index("c") < table.index("b")  # sorted by v, descending
    assert " a " not in table


def test_submit_json_records(server: LiveServer, tmp_path: Path) -> None:
    records = tmp_path / "records.json"
    records.write_text(json.dumps([{"x": 1}, {"x": 2}]))

    result = jobsvc("submit", str(records), "--task", "summarize", "--wait", url=server.url)

    assert result.returncode == 0, result.stderr
    assert '"rows": 2' in result.stdout


def test_a_failed_job_exits_1_with_one_line(server: LiveServer, csv_file: Path) -> None:
    result = jobsvc(
        "submit",
        str(csv_file),
        "--task",
        "boom",
        "--param",
        "message=the input is wrong",
        "--wait",
        url=server.url,
    )

    line = assert_one_line_failure(result, "ValueError", "the input is wrong")
    assert result.stdout.splitlines()[0] in line  # names the job


def test_a_missing_file_is_one_line(server: LiveServer, tmp_path: Path) -> None:
    result = jobsvc("submit", str(tmp_path / "nope.csv"), "--task", "double", url=server.url)

    assert_one_line_failure(result, "nope.csv")


def test_an_unsupported_file_type_is_one_line(server: LiveServer, tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")

    result = jobsvc("submit", str(path), "--task", "double", url=server.url)

    assert_one_line_failure(result, "unsupported file type", ".csv")


def test_a_refused_submit_prints_the_api_detail(server: LiveServer, csv_file: Path) -> None:
    unknown = jobsvc("submit", str(csv_file), "--task", "no_such_task", url=server.url)
    bad_param = jobsvc(
        "submit", str(csv_file), "--task", "double", "--param", "factor=lots", url=server.url
    )

    assert_one_line_failure(unknown, "422", "no_such_task")
    assert_one_line_failure(bad_param, "422", "factor")


def test_server_down_is_one_line(tmp_path: Path, csv_file: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"

    listing = jobsvc("jobs", "list", url=url)
    submitted = jobsvc("submit", str(csv_file), "--task", "double", url=url)

    assert_one_line_failure(listing, "cannot reach jobsvc at", url)
    assert_one_line_failure(submitted, "cannot reach jobsvc at", url)


def test_jobs_list_and_show(server: LiveServer, csv_file: Path) -> None:
    failed = jobsvc(
        "submit",
        str(csv_file),
        "--task",
        "boom",
        "--param",
        "message=listed failure",
        "--wait",
        url=server.url,
    )
    job_id = failed.stderr.split()[1]

    listing = jobsvc("jobs", "list", "--status", "failed", "--task", "boom", url=server.url)
    succeeded_only = jobsvc("jobs", "list", "--status", "succeeded", url=server.url)
    shown = jobsvc("jobs", "show", job_id, url=server.url)

    assert listing.returncode == 0, listing.stderr
    assert job_id in listing.stdout
    assert "ValueError" in listing.stdout
    # On an 80-column terminal the id and the status are still whole, on one line.
    narrow = jobsvc("jobs", "list", url=server.url, columns=80)
    row = next(line for line in narrow.stdout.splitlines() if job_id in line)
    assert row.split()[:4] == [job_id, "boom", "failed", "3/3"], narrow.stdout
    assert max(len(line) for line in narrow.stdout.splitlines()) <= 80
    assert job_id not in succeeded_only.stdout
    assert shown.returncode == 0, shown.stderr
    assert "listed failure" in shown.stdout
    assert "raise ValueError(message)" in shown.stdout  # the job's traceback
    events = shown.stdout[shown.stdout.index("events") :]
    for status in ("queued", "running", "retrying", "failed"):
        assert status in events


def test_cancel_and_retry(server: LiveServer, csv_file: Path, tmp_path: Path) -> None:
    release = tmp_path / "release"
    submitted = jobsvc(
        "submit",
        str(csv_file),
        "--task",
        "wait_for_file",
        "--param",
        f"path={release}",
        url=server.url,
    )
    job_id = submitted.stdout.strip()

    cancelled = jobsvc("jobs", "cancel", job_id, url=server.url)
    again = jobsvc("jobs", "cancel", job_id, url=server.url)
    retried = jobsvc("jobs", "retry", job_id, url=server.url)
    release.touch()

    assert cancelled.returncode == 0, cancelled.stderr
    assert "cancelled" in cancelled.stdout
    assert_one_line_failure(again, "409")
    assert retried.returncode == 0, retried.stderr
    assert "queued" in retried.stdout
    assert wait_terminal(server, job_id)["status"] == "succeeded"
    assert_one_line_failure(jobsvc("jobs", "retry", job_id, url=server.url), "409")


def test_an_unknown_job_is_one_line(server: LiveServer) -> None:
    result = jobsvc("jobs", "show", "no-such-job", url=server.url)

    assert_one_line_failure(result, "404", "no-such-job")


def test_db_upgrade_then_current(tmp_path: Path) -> None:
    env = server_env(f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}")

    before = jobsvc("db", "current", url="", env=env)
    upgraded = jobsvc("db", "upgrade", url="", env=env)
    after = jobsvc("db", "current", url="", env=env)

    assert before.returncode == 0, before.stderr
    assert "(empty database)" in before.stdout
    assert upgraded.returncode == 0, upgraded.stderr
    assert after.returncode == 0, after.stderr
    assert migrate.head() in after.stdout
