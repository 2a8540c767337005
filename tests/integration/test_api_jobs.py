"""Reading and changing jobs through the HTTP API: list, results, events, cancel, retry."""

from __future__ import annotations

import asyncio
import io
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from tests.conftest import events_of, submit, wait_for_status

RECORDS = [{"a": 1, "b": 2.5, "c": "x"}, {"a": 3, "b": -1.0, "c": "y"}]
PARQUET = "application/vnd.apache.parquet"
FAR_FUTURE = (datetime.now(UTC) + timedelta(days=365)).isoformat()


def statuses(events: list[dict[str, Any]]) -> list[str]:
    return [event["status"] for event in events]


def when(value: str | None) -> datetime:
    assert value is not None
    return datetime.fromisoformat(value)


async def hold_worker(client: httpx.AsyncClient, release: Path) -> dict[str, Any]:
    """Occupy the only worker until ``release`` exists."""
    job = await submit(client, "wait_for_file", params={"path": str(release)})
    return await wait_for_status(client, job["id"], "running")


async def succeeded(client: httpx.AsyncClient, task: str, **body: Any) -> dict[str, Any]:
    job = await submit(client, task, **body)
    done = await wait_for_status(client, job["id"])
    assert done["status"] == "succeeded", done
    return done


async def failed(client: httpx.AsyncClient, task: str, **body: Any) -> dict[str, Any]:
    job = await submit(client, task, **body)
    done = await wait_for_status(client, job["id"])
    assert done["status"] == "failed", done
    return done


# --- listing ------------------------------------------------------------------------------------


async def test_list_is_newest_first(client: httpx.AsyncClient) -> None:
    submitted = [
        (await submit(client, "double", data=RECORDS[:1], run_at=FAR_FUTURE))["id"]
        for _ in range(5)
    ]
    page = (await client.get("/jobs")).json()
    assert [item["id"] for item in page["items"]] == submitted[::-1]
    assert page["next_cursor"] is None


async def test_list_filters_by_status_and_task(client: httpx.AsyncClient) -> None:
    done = await succeeded(client, "double", data=RECORDS[:1])
    broken = await failed(client, "boom", max_attempts=1)
    waiting = await submit(client, "double", data=RECORDS[:1], run_at=FAR_FUTURE)

    async def ids(query: str) -> set[str]:
        response = await client.get(f"/jobs?{query}")
        assert response.status_code == 200, response.text
        return {item["id"] for item in response.json()["items"]}

    assert await ids("status=succeeded") == {done["id"]}
    assert await ids("status=succeeded&status=failed") == {done["id"], broken["id"]}
    assert await ids("status=queued&status=failed") == {waiting["id"], broken["id"]}
    assert await ids("status=cancelled") == set()
    assert await ids("task=double") == {done["id"], waiting["id"]}
    assert await ids("task=boom") == {broken["id"]}
    assert await ids("task=double&status=queued") == {waiting["id"]}
    assert await ids("task=nap") == set()
    assert (await client.get("/jobs?status=finished")).status_code == 422


async def test_pagination_walks_every_job_once(client: httpx.AsyncClient) -> None:
    submitted = [
        (await submit(client, "double", data=RECORDS[:1], run_at=FAR_FUTURE))["id"]
        for _ in range(7)
    ]
    seen: list[str] = []
    pages = 0
    cursor: str | None = None
    while True:
        query: dict[str, str | int] = {"limit": 3}
        if cursor is not None:
            query["cursor"] = cursor
        page = (await client.get("/jobs", params=query)).json()
        pages += 1
        assert len(page["items"]) <= 3
        seen.extend(item["id"] for item in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert pages < 10, "the cursor never ends"
    assert pages == 3
    assert seen == submitted[::-1]


async def test_pagination_with_a_filter(client: httpx.AsyncClient) -> None:
    doubles = [
        (await submit(client, "double", data=RECORDS[:1], run_at=FAR_FUTURE))["id"]
        for _ in range(4)
    ]
    await submit(client, "boom", run_at=FAR_FUTURE)
    first = (await client.get("/jobs", params={"task": "double", "limit": 2})).json()
    second = (
        await client.get(
            "/jobs", params={"task": "double", "limit": 2, "cursor": first["next_cursor"]}
        )
    ).json()
    assert [item["id"] for item in first["items"] + second["items"]] == doubles[::-1]
    # A last page exactly full: a further page, if offered, is empty.
    if second["next_cursor"] is not None:
        rest = await client.get(
            "/jobs", params={"task": "double", "limit": 2, "cursor": second["next_cursor"]}
        )
        assert rest.json()["items"] == []


@pytest.mark.parametrize("limit", [0, -1, 501, "x"])
async def test_list_limit_out_of_range(client: httpx.AsyncClient, limit: object) -> None:
    response = await client.get("/jobs", params={"limit": str(limit)})
    assert response.status_code == 422, response.text
    assert "limit" in json.dumps(response.json()["detail"])


@pytest.mark.parametrize(
    ("method", "suffix"),
    [
        ("GET", ""),
        ("GET", "/events"),
        ("GET", "/result"),
        ("POST", "/cancel"),
        ("POST", "/retry"),
    ],
)
async def test_unknown_job_is_404_everywhere(
    client: httpx.AsyncClient, method: str, suffix: str
) -> None:
    await submit(client, "double", data=RECORDS[:1], run_at=FAR_FUTURE)
    missing = "01890000-0000-7000-8000-000000000000"
    response = await client.request(method, f"/jobs/{missing}{suffix}")
    assert response.status_code == 404, response.text
    assert missing in response.json()["detail"]


# --- results --------------------------------------------------------------------------------------


async def test_dataframe_result_in_every_format(client: httpx.AsyncClient) -> None:
    records = [{"a": 1, "b": 2.5}, {"a": 3, "b": -1.0}, {"a": -4, "b": 0.25}]
    job = await succeeded(client, "double", data=records, params={"factor": 3})
    assert job["result_url"] == f"/jobs/{job['id']}/result"
    expected = pd.DataFrame(records) * 3

    as_json = await client.get(job["result_url"])
    assert as_json.status_code == 200
    assert as_json.headers["content-type"].startswith("application/json")
    assert as_json.json() == expected.to_dict(orient="records")

    as_csv = await client.get(job["result_url"], headers={"Accept": "text/csv"})
    assert as_csv.status_code == 200
    assert as_csv.headers["content-type"].startswith("text/csv")
    pd.testing.assert_frame_equal(pd.read_csv(io.BytesIO(as_csv.content)), expected)

    as_parquet = await client.get(job["result_url"], headers={"Accept": PARQUET})
    assert as_parquet.status_code == 200
    assert as_parquet.headers["content-type"].startswith(PARQUET)
    pd.testing.assert_frame_equal(pd.read_parquet(io.BytesIO(as_parquet.content)), expected)


@pytest.mark.parametrize(
    ("accept", "media"),
    [
        ("*/*", "application/json"),
        ("text/*", "text/csv"),
        ("text/html, text/csv;q=0.5", "text/csv"),
        ("text/csv;q=0.2, application/vnd.apache.parquet;q=0.9", PARQUET),
        ("application/json;q=0, */*;q=0.1", "text/csv"),
    ],
)
async def test_result_format_follows_accept_preferences(
    client: httpx.AsyncClient, accept: str, media: str
) -> None:
    job = await succeeded(client, "double", data=RECORDS[:1])
    response = await client.get(job["result_url"], headers={"Accept": accept})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].split(";")[0] == media


@pytest.mark.parametrize("accept", ["image/png", "text/html", "application/json;q=0"])
async def test_unsatisfiable_accept_is_406(client: httpx.AsyncClient, accept: str) -> None:
    job = await succeeded(client, "double", data=RECORDS[:1])
    response = await client.get(job["result_url"], headers={"Accept": accept})
    assert response.status_code == 406, response.text
    assert "text/csv" in response.json()["detail"]


async def test_dict_result_is_json_only(client: httpx.AsyncClient) -> None:
    job = await succeeded(client, "nap", data=RECORDS, params={"seconds": 0.01, "steps": 1})
    response = await client.get(job["result_url"])
    assert response.status_code == 200
    assert response.json() == {"rows": 2, "slept": 0.01}
    for media in ("text/csv", PARQUET):
        refused = await client.get(job["result_url"], headers={"Accept": media})
        assert refused.status_code == 406, refused.text
        assert "json" in refused.json()["detail"].lower()


async def test_none_result_is_json_null(client: httpx.AsyncClient) -> None:
    job = await succeeded(client, "nothing", data=RECORDS)
    response = await client.get(job["result_url"])
    assert response.status_code == 200
    assert response.content == b"null"
    assert response.json() is None


async def test_result_while_queued_or_running_is_409(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    running = await hold_worker(client, release)
    queued = await submit(client, "double", data=RECORDS)
    for job, status in ((running, "running"), (queued, "queued")):
        response = await client.get(f"/jobs/{job['id']}/result")
        assert response.status_code == 409, response.text
        assert status in response.json()["detail"]
        assert (await client.get(f"/jobs/{job['id']}")).json()["result_url"] is None
    release.touch()
    assert (await wait_for_status(client, queued["id"]))["status"] == "succeeded"


async def test_result_of_a_failed_job_is_409(client: httpx.AsyncClient) -> None:
    job = await failed(client, "boom", max_attempts=1)
    assert job["result_url"] is None
    response = await client.get(f"/jobs/{job['id']}/result")
    assert response.status_code == 409, response.text
    assert "failed" in response.json()["detail"]


async def test_csv_result_neutralises_formulas(client: httpx.AsyncClient) -> None:
    job = await succeeded(client, "texts")
    as_csv = await client.get(job["result_url"], headers={"Accept": "text/csv"})
    assert as_csv.status_code == 200
    frame = pd.read_csv(io.BytesIO(as_csv.content), dtype={"cell": str}, keep_default_na=False)
    assert frame["cell"].tolist() == ["'=1+1", "'+cmd", "'-2+3", "'@SUM(A1)", "'\tx", "plain"]
    # Numbers are not text: a negative number stays a number.
    assert frame["n"].tolist() == [1, 2, 3, 4, 5, -6]
    as_json = (await client.get(job["result_url"])).json()
    assert [row["cell"] for row in as_json] == ["=1+1", "+cmd", "-2+3", "@SUM(A1)", "\tx", "plain"]


async def test_csv_result_neutralises_formula_column_names(client: httpx.AsyncClient) -> None:
    job = await succeeded(client, "double", data=[{"=HYPERLINK(1)": 1, "ok": 2}])
    as_csv = await client.get(job["result_url"], headers={"Accept": "text/csv"})
    header = as_csv.text.splitlines()[0]
    assert header.startswith("'=HYPERLINK(1)") or header.startswith("\"'=HYPERLINK(1)")


async def test_a_list_result_fails_with_a_type_error(client: httpx.AsyncClient) -> None:
    job = await failed(client, "not_a_result", data=RECORDS, max_attempts=1)
    assert job["error"]["type"] == "TypeError"
    assert "list" in job["error"]["message"]
    assert "a DataFrame, a dict or None" in job["error"]["message"]


# --- events and failures --------------------------------------------------------------------------


async def test_events_of_a_succeeded_job(client: httpx.AsyncClient) -> None:
    job = await succeeded(client, "double", data=RECORDS[:1])
    events = await events_of(client, job["id"])
    assert statuses(events) == ["queued", "running", "succeeded"]
    assert [event["attempt"] for event in events] == [0, 1, 1]
    assert all(event["error"] is None for event in events)
    times = [when(event["at"]) for event in events]
    assert times == sorted(times)
    assert times[0] == when(job["created_at"])
    assert times[1] == when(job["started_at"])
    assert times[2] == when(job["finished_at"])
    assert job["attempts"] == 1
    assert job["error"] is None


async def test_a_failing_job_records_its_error(client: httpx.AsyncClient) -> None:
    job = await failed(client, "boom", params={"message": "it broke"}, max_attempts=2)
    assert job["attempts"] == 2
    assert job["max_attempts"] == 2
    assert job["finished_at"] is not None
    error = job["error"]
    assert error["type"] == "ValueError"
    assert error["message"] == "it broke"
    assert "Traceback" in error["traceback"]
    assert "ValueError: it broke" in error["traceback"]

    events = await events_of(client, job["id"])
    assert statuses(events) == ["queued", "running", "retrying", "running", "failed"]
    assert [event["attempt"] for event in events] == [0, 1, 1, 2, 2]
    for event in (events[2], events[4]):
        assert event["error"]["type"] == "ValueError"
        assert event["error"]["message"] == "it broke"
        assert "raise ValueError(message)" in event["error"]["traceback"]
    assert [event["error"] for event in (events[0], events[1], events[3])] == [None] * 3


async def test_a_job_that_fails_once_succeeds_on_its_second_attempt(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    counter = tmp_path / "counter"
    job = await succeeded(client, "fail_times", params={"counter": str(counter), "failures": 1})
    assert job["attempts"] == 2
    assert counter.read_text() == "2"
    result = (await client.get(job["result_url"])).json()
    assert result == {"attempts_seen": 2}
    events = await events_of(client, job["id"])
    assert statuses(events) == ["queued", "running", "retrying", "running", "succeeded"]
    assert events[2]["attempt"] == 1
    assert events[2]["error"]["type"] == "RuntimeError"
    assert events[2]["error"]["message"] == "failure 1 of 1"
    assert events[4]["attempt"] == 2
    assert events[4]["error"] is None


async def test_a_task_past_its_timeout_fails(client: httpx.AsyncClient) -> None:
    job = await failed(client, "slow", max_attempts=1)
    assert job["error"]["type"] == "TimeoutError"
    assert "timeout" in job["error"]["message"]
    assert statuses(await events_of(client, job["id"])) == ["queued", "running", "failed"]
    # The killed worker is replaced.
    await succeeded(client, "double", data=RECORDS[:1])


async def test_a_task_that_kills_its_worker_fails_and_spares_the_service(
    client: httpx.AsyncClient,
) -> None:
    job = await failed(client, "die", max_attempts=2)
    assert job["attempts"] == 2
    assert job["error"]["type"] == "WorkerLost"
    events = await events_of(client, job["id"])
    assert statuses(events) == ["queued", "running", "retrying", "running", "failed"]
    assert [event["error"]["type"] for event in (events[2], events[4])] == ["WorkerLost"] * 2
    assert "SIGKILL" in events[4]["error"]["message"]
    after = await succeeded(client, "double", data=RECORDS[:1], params={"factor": 5})
    assert (await client.get(after["result_url"])).json() == [{"a": 5, "b": 12.5, "c": "xxxxx"}]


# --- cancel ---------------------------------------------------------------------------------------


async def test_cancel_a_queued_job(client: httpx.AsyncClient, tmp_path: Path) -> None:
    release = tmp_path / "release"
    holder = await hold_worker(client, release)
    job = await submit(client, "double", data=RECORDS)
    response = await client.post(f"/jobs/{job['id']}/cancel")
    assert response.status_code == 200, response.text
    cancelled = response.json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["finished_at"] is not None
    release.touch()
    assert (await wait_for_status(client, holder["id"]))["status"] == "succeeded"
    # The worker is free again and took the next job, not the cancelled one.
    await succeeded(client, "double", data=RECORDS)
    after = (await client.get(f"/jobs/{job['id']}")).json()
    assert after["status"] == "cancelled"
    assert after["attempts"] == 0
    assert after["started_at"] is None
    events = await events_of(client, job["id"])
    assert statuses(events) == ["queued", "cancelled"]


async def test_cancel_a_running_job_frees_its_worker(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    release = tmp_path / "never"
    running = await hold_worker(client, release)
    response = await client.post(f"/jobs/{running['id']}/cancel")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    # With one worker, this can only run once the cancelled attempt has let go of it.
    await succeeded(client, "double", data=RECORDS)
    after = (await client.get(f"/jobs/{running['id']}")).json()
    assert after["status"] == "cancelled"
    assert after["result_url"] is None
    assert statuses(await events_of(client, running["id"])) == ["queued", "running", "cancelled"]


async def test_cancel_a_retrying_job(client: httpx.AsyncClient) -> None:
    job = await submit(client, "boom", max_attempts=3, retry_delay=3600)
    await wait_for_status(client, job["id"], "retrying")
    response = await client.post(f"/jobs/{job['id']}/cancel")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    events = await events_of(client, job["id"])
    assert statuses(events) == ["queued", "running", "retrying", "cancelled"]


async def test_cancel_a_succeeded_job_is_409(client: httpx.AsyncClient) -> None:
    job = await succeeded(client, "double", data=RECORDS)
    response = await client.post(f"/jobs/{job['id']}/cancel")
    assert response.status_code == 409, response.text
    assert "succeeded" in response.json()["detail"]
    assert (await client.get(f"/jobs/{job['id']}")).json()["status"] == "succeeded"


# --- retry ----------------------------------------------------------------------------------------


async def test_retry_a_failed_job(client: httpx.AsyncClient, tmp_path: Path) -> None:
    counter = tmp_path / "counter"
    job = await failed(
        client, "fail_times", params={"counter": str(counter), "failures": 1}, max_attempts=1
    )
    assert job["attempts"] == 1
    assert job["error"]["type"] == "RuntimeError"

    response = await client.post(f"/jobs/{job['id']}/retry")
    assert response.status_code == 200, response.text
    queued = response.json()
    assert queued["status"] == "queued"
    assert queued["attempts"] == 0
    assert queued["error"] is None
    assert queued["finished_at"] is None

    done = await wait_for_status(client, job["id"])
    assert done["status"] == "succeeded"
    assert done["attempts"] == 1
    assert (await client.get(done["result_url"])).json() == {"attempts_seen": 2}
    events = await events_of(client, job["id"])
    assert statuses(events) == ["queued", "running", "failed", "queued", "running", "succeeded"]
    assert [event["attempt"] for event in events] == [0, 1, 1, 0, 1, 1]
    assert events[2]["error"]["message"] == "failure 1 of 1"


async def test_retry_a_cancelled_job(client: httpx.AsyncClient, tmp_path: Path) -> None:
    release = tmp_path / "release"
    holder = await hold_worker(client, release)
    job = await submit(client, "double", data=RECORDS)
    assert (await client.post(f"/jobs/{job['id']}/cancel")).status_code == 200
    response = await client.post(f"/jobs/{job['id']}/retry")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "queued"
    release.touch()
    await wait_for_status(client, holder["id"])
    done = await wait_for_status(client, job["id"])
    assert done["status"] == "succeeded"
    assert statuses(await events_of(client, job["id"])) == [
        "queued",
        "cancelled",
        "queued",
        "running",
        "succeeded",
    ]


async def test_retry_a_queued_or_succeeded_job_is_409(client: httpx.AsyncClient) -> None:
    done = await succeeded(client, "double", data=RECORDS)
    waiting = await submit(client, "double", data=RECORDS, run_at=FAR_FUTURE)
    for job, status in ((done, "succeeded"), (waiting, "queued")):
        response = await client.post(f"/jobs/{job['id']}/retry")
        assert response.status_code == 409, response.text
        assert status in response.json()["detail"]
        assert (await client.get(f"/jobs/{job['id']}")).json()["status"] == status


# --- the state machine ----------------------------------------------------------------------------


async def _job_in(client: httpx.AsyncClient, state: str, tmp_path: Path) -> dict[str, Any]:
    if state == "queued":
        return await submit(client, "double", data=RECORDS, run_at=FAR_FUTURE)
    if state == "running":
        return await hold_worker(client, tmp_path / "never")
    if state == "retrying":
        job = await submit(client, "boom", max_attempts=2, retry_delay=3600)
        return await wait_for_status(client, job["id"], "retrying")
    if state == "succeeded":
        return await succeeded(client, "double", data=RECORDS)
    if state == "failed":
        return await failed(client, "boom", max_attempts=1)
    assert state == "cancelled"
    job = await submit(client, "double", data=RECORDS, run_at=FAR_FUTURE)
    assert (await client.post(f"/jobs/{job['id']}/cancel")).status_code == 200
    return job


@pytest.mark.parametrize(
    ("state", "cancel", "retry"),
    [
        ("queued", 200, 409),
        ("running", 200, 409),
        ("retrying", 200, 409),
        ("succeeded", 409, 409),
        ("failed", 409, 200),
        ("cancelled", 409, 200),
    ],
)
async def test_state_machine(
    client: httpx.AsyncClient, tmp_path: Path, state: str, cancel: int, retry: int
) -> None:
    """Cancel and retry, from each state, answer exactly as the contract says."""
    job = await _job_in(client, state, tmp_path)
    assert (await client.get(f"/jobs/{job['id']}")).json()["status"] == state
    before = await events_of(client, job["id"])

    retried = await client.post(f"/jobs/{job['id']}/retry")
    assert retried.status_code == retry, retried.text
    if retry == 409:
        assert state in retried.json()["detail"]
        assert await events_of(client, job["id"]) == before
    else:
        assert retried.json()["status"] == "queued"
        assert retried.json()["attempts"] == 0
        return

    cancelled = await client.post(f"/jobs/{job['id']}/cancel")
    assert cancelled.status_code == cancel, cancelled.text
    if cancel == 409:
        assert state in cancelled.json()["detail"]
        assert await events_of(client, job["id"]) == before
        assert (await client.get(f"/jobs/{job['id']}")).json()["status"] == state
        return
    assert cancelled.json()["status"] == "cancelled"
    # Cancelled is terminal: a second cancel is refused.
    again = await client.post(f"/jobs/{job['id']}/cancel")
    assert again.status_code == 409, again.text
    assert "cancelled" in again.json()["detail"]


# --- progress, tasks, health ----------------------------------------------------------------------


async def test_progress_is_reported_while_running_and_is_one_after(
    client: httpx.AsyncClient,
) -> None:
    job = await submit(client, "nap", data=RECORDS, params={"seconds": 1.0, "steps": 10})
    assert job["progress"] is None
    seen: list[float] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        current = (await client.get(f"/jobs/{job['id']}")).json()
        if current["status"] in ("succeeded", "failed", "cancelled"):
            break
        if current["status"] == "running" and current["progress"] is not None:
            seen.append(current["progress"])
        await asyncio.sleep(0.02)  # a polling interval, as in wait_for_status
    partial = [value for value in seen if 0 < value < 1]
    assert partial, f"no progress seen between 0 and 1: {seen}"
    assert seen == sorted(seen)
    done = await wait_for_status(client, job["id"])
    assert done["status"] == "succeeded"
    assert done["progress"] == 1.0


async def test_tasks_lists_every_task_with_a_params_schema(client: httpx.AsyncClient) -> None:
    response = await client.get("/tasks")
    assert response.status_code == 200
    tasks = {task["name"]: task for task in response.json()}
    expected = {
        "summarize",
        "pipeline",
        "double",
        "boom",
        "nap",
        "wait_for_file",
        "die",
        "die_once",
        "fail_times",
        "slow",
        "nothing",
        "not_a_result",
        "texts",
    }
    assert expected <= tasks.keys()
    for task in tasks.values():
        assert task["params_schema"]["type"] == "object"
    assert "steps" in tasks["pipeline"]["params_schema"]["properties"]
    assert "steps" in tasks["pipeline"]["params_schema"].get("required", [])
    assert tasks["double"]["params_schema"]["properties"]["factor"]["type"] == "integer"
    assert tasks["wait_for_file"]["params_schema"]["required"] == ["path"]
    assert tasks["slow"]["timeout"] == 0.5
    assert "long job" in tasks["nap"]["description"]


async def test_healthz(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok"}
