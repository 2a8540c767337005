"""Submitting jobs through the HTTP API: every accepted body, the options, and bad input."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
from asgi_lifespan import LifespanManager

from jobsvc.api import json_body
from jobsvc.app import create_app
from tests.conftest import make_settings, submit, wait_for_status

JOB_FIELDS = {
    "id",
    "task",
    "status",
    "attempts",
    "max_attempts",
    "priority",
    "params",
    "created_at",
    "started_at",
    "finished_at",
    "progress",
    "error",
    "result_url",
}
RECORDS = [{"a": 1, "b": 2.5}, {"a": 3, "b": -1.0}]
CSV_BODY = b"a,b\n1,2.5\n3,-1.0\n"
DOUBLED = [{"a": 2, "b": 5.0}, {"a": 6, "b": -2.0}]
SMALL_LIMIT = 1000
SMALL_COLUMNS = 5


@asynccontextmanager
async def serve(database_url: str, **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a service of its own, with settings unlike the default fixture's."""
    application = create_app(make_settings(database_url, **overrides), migrate_on_start=False)
    async with LifespanManager(application, startup_timeout=60, shutdown_timeout=60):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://jobsvc") as http:
            yield http


@pytest.fixture
async def small_client(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """A service whose request bodies may be 1000 bytes at most."""
    async with serve(database_url, max_upload_bytes=SMALL_LIMIT) as http:
        yield http


@pytest.fixture
async def narrow_client(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """A service that takes at most five columns."""
    async with serve(database_url, max_columns=SMALL_COLUMNS) as http:
        yield http


async def job_ids(client: httpx.AsyncClient) -> list[str]:
    response = await client.get("/jobs")
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["items"]]


async def result_records(client: httpx.AsyncClient, job_id: str) -> Any:
    done = await wait_for_status(client, job_id)
    assert done["status"] == "succeeded", done
    response = await client.get(f"/jobs/{job_id}/result")
    assert response.status_code == 200, response.text
    return response.json()


async def assert_refused(
    client: httpx.AsyncClient, response: httpx.Response, status: int, *words: str
) -> None:
    """The status, a detail naming the problem, and nothing stored."""
    assert response.status_code == status, response.text
    detail = json.dumps(response.json()["detail"]).lower()
    for word in words:
        assert word.lower() in detail, f"{word!r} not in {detail}"
    assert await job_ids(client) == []


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def when(value: str | None) -> datetime:
    assert value is not None
    return datetime.fromisoformat(value)


# --- accepted bodies ---------------------------------------------------------------------------


async def test_json_submit_is_accepted_with_location_and_the_job(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(
        "/jobs", json={"task": "double", "params": {"factor": 2}, "data": RECORDS}
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert job.keys() >= JOB_FIELDS
    assert response.headers["location"] == f"/jobs/{job['id']}"
    assert isinstance(job["id"], str)
    assert job["task"] == "double"
    assert job["status"] == "queued"
    assert job["attempts"] == 0
    assert job["priority"] == 0
    assert job["params"] == {"factor": 2}
    assert job["max_attempts"] == 3  # the service default: neither task nor submit set it
    assert job["started_at"] is None
    assert job["finished_at"] is None
    assert job["error"] is None
    assert job["result_url"] is None
    assert when(job["created_at"]).utcoffset() == timedelta(0)
    # The job is stored: the Location answers with the same job.
    fetched = (await client.get(response.headers["location"])).json()
    assert fetched["id"] == job["id"]
    assert await result_records(client, job["id"]) == DOUBLED


async def test_params_defaults_are_filled_in(client: httpx.AsyncClient) -> None:
    job = await submit(client, "double", data=RECORDS)
    assert job["params"] == {"factor": 2}


async def test_csv_body_with_task_and_params_in_the_query(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/jobs",
        params={"task": "double", "params": json.dumps({"factor": 3})},
        content=CSV_BODY,
        headers={"Content-Type": "text/csv; charset=utf-8"},
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/jobs/{job['id']}"
    assert job["params"] == {"factor": 3}
    assert await result_records(client, job["id"]) == [{"a": 3, "b": 7.5}, {"a": 9, "b": -3.0}]


async def test_ndjson_body(client: httpx.AsyncClient) -> None:
    body = "\n".join(json.dumps(record) for record in RECORDS).encode() + b"\n"
    response = await client.post(
        "/jobs",
        params={"task": "double"},
        content=body,
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert response.status_code == 202, response.text
    assert await result_records(client, response.json()["id"]) == DOUBLED


async def test_parquet_body(client: httpx.AsyncClient) -> None:
    frame = pd.DataFrame({"a": [1, 3], "b": [2.5, -1.0]})
    response = await client.post(
        "/jobs?task=double",
        content=parquet_bytes(frame),
        headers={"Content-Type": "application/vnd.apache.parquet"},
    )
    assert response.status_code == 202, response.text
    assert await result_records(client, response.json()["id"]) == DOUBLED


async def test_multipart_with_file_task_and_params(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/jobs",
        files={"file": ("input.csv", CSV_BODY, "text/csv")},
        data={"task": "double", "params": json.dumps({"factor": 10})},
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["task"] == "double"
    assert job["params"] == {"factor": 10}
    assert await result_records(client, job["id"]) == [{"a": 10, "b": 25.0}, {"a": 30, "b": -10.0}]


@pytest.mark.parametrize("kind", ["csv", "parquet"])
async def test_multipart_file_type_comes_from_the_filename(
    client: httpx.AsyncClient, kind: str
) -> None:
    content = CSV_BODY if kind == "csv" else parquet_bytes(pd.DataFrame(RECORDS))
    response = await client.post(
        "/jobs",
        files={"file": (f"input.{kind}", content, "application/octet-stream")},
        data={"task": "double"},
    )
    assert response.status_code == 202, response.text
    assert await result_records(client, response.json()["id"]) == DOUBLED


async def test_lower_priority_value_runs_first(client: httpx.AsyncClient, tmp_path: Path) -> None:
    release = tmp_path / "release"
    hold = await submit(client, "wait_for_file", params={"path": str(release)})
    await wait_for_status(client, hold["id"], "running")
    # Submitted first, so plain arrival order would run it first.
    low = await submit(client, "double", data=RECORDS, priority=10)
    high = await submit(client, "double", data=RECORDS, priority=-10)
    assert (low["priority"], high["priority"]) == (10, -10)
    release.touch()
    low_done = await wait_for_status(client, low["id"])
    high_done = await wait_for_status(client, high["id"])
    assert low_done["status"] == high_done["status"] == "succeeded"
    assert when(high_done["started_at"]) < when(low_done["started_at"])


async def test_run_at_in_the_future_is_not_run_before_it(client: httpx.AsyncClient) -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    scheduled = await submit(client, "double", data=RECORDS, run_at=later.isoformat())
    assert when(scheduled["run_at"]) == later
    now_job = await submit(client, "double", data=RECORDS)
    assert (await wait_for_status(client, now_job["id"]))["status"] == "succeeded"
    still = (await client.get(f"/jobs/{scheduled['id']}")).json()
    assert still["status"] == "queued"
    assert still["attempts"] == 0
    assert still["started_at"] is None


async def test_run_at_soon_runs_once_due(client: httpx.AsyncClient) -> None:
    due = datetime.now(UTC) + timedelta(seconds=0.8)
    job = await submit(client, "double", data=RECORDS, run_at=due.isoformat())
    done = await wait_for_status(client, job["id"])
    assert done["status"] == "succeeded"
    assert when(done["started_at"]) >= due


async def test_idempotency_key_replays_the_first_job(client: httpx.AsyncClient) -> None:
    body = {"task": "double", "params": {"factor": 2}, "data": RECORDS}
    headers = {"Idempotency-Key": "order-42"}
    first = await client.post("/jobs", json=body, headers=headers)
    assert first.status_code == 202, first.text
    second = await client.post("/jobs", json=body, headers=headers)
    assert second.status_code == 200, second.text
    assert second.json()["id"] == first.json()["id"]
    assert second.headers["location"] == first.headers["location"]
    assert await job_ids(client) == [first.json()["id"]]


async def test_idempotency_key_with_another_body_is_a_conflict(
    client: httpx.AsyncClient,
) -> None:
    headers = {"Idempotency-Key": "order-43"}
    first = await client.post("/jobs", json={"task": "double", "data": RECORDS}, headers=headers)
    assert first.status_code == 202, first.text
    other = await client.post(
        "/jobs", json={"task": "double", "data": [{"a": 99}]}, headers=headers
    )
    assert other.status_code == 409, other.text
    assert "idempotency-key" in other.json()["detail"].lower()
    assert await job_ids(client) == [first.json()["id"]]


async def test_idempotency_key_on_a_file_upload(client: httpx.AsyncClient) -> None:
    def post(content: bytes) -> Any:
        return client.post(
            "/jobs?task=double",
            content=content,
            headers={"Content-Type": "text/csv", "Idempotency-Key": "upload-1"},
        )

    first = await post(CSV_BODY)
    assert first.status_code == 202, first.text
    again = await post(CSV_BODY)
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    different = await post(b"a,b\n5,6\n")
    assert different.status_code == 409, different.text
    assert await job_ids(client) == [first.json()["id"]]


# --- bad input: a clear 4xx, nothing stored ---------------------------------------------------


async def test_an_idempotency_key_too_long(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/jobs", json={"task": "double", "data": RECORDS}, headers={"Idempotency-Key": "k" * 201}
    )
    await assert_refused(client, response, 422, "Idempotency-Key")


async def test_upload_options_from_the_query_are_checked(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/jobs?task=double&priority=soon", content=CSV_BODY, headers={"Content-Type": "text/csv"}
    )
    await assert_refused(client, response, 422, "priority")
    good = await client.post(
        "/jobs?task=double&priority=-3&max_attempts=2&run_at=2030-01-01T00:00:00Z",
        content=CSV_BODY,
        headers={"Content-Type": "text/csv"},
    )
    assert good.status_code == 202, good.text
    job = good.json()
    assert (job["priority"], job["max_attempts"], job["run_at"]) == (
        -3,
        2,
        "2030-01-01T00:00:00Z",
    )


async def test_unknown_task(client: httpx.AsyncClient) -> None:
    response = await client.post("/jobs", json={"task": "no_such_task", "data": RECORDS})
    await assert_refused(client, response, 422, "no_such_task")


async def test_unknown_task_for_a_file_upload(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/jobs?task=no_such_task", content=CSV_BODY, headers={"Content-Type": "text/csv"}
    )
    await assert_refused(client, response, 422, "no_such_task")


async def test_file_upload_without_a_task(client: httpx.AsyncClient) -> None:
    response = await client.post("/jobs", content=CSV_BODY, headers={"Content-Type": "text/csv"})
    await assert_refused(client, response, 422, "task")


@pytest.mark.parametrize(
    ("params", "word"),
    [
        ({"factor": 2, "bogus": 1}, "bogus"),
        ({"factor": "two"}, "factor"),
        ({"factor": [2]}, "integer"),
    ],
)
async def test_bad_params_for_a_user_task(
    client: httpx.AsyncClient, params: dict[str, Any], word: str
) -> None:
    response = await client.post("/jobs", json={"task": "double", "params": params})
    await assert_refused(client, response, 422, word)


async def test_missing_required_param(client: httpx.AsyncClient) -> None:
    response = await client.post("/jobs", json={"task": "wait_for_file", "params": {}})
    await assert_refused(client, response, 422, "path", "missing")


async def test_bad_params_in_a_file_upload(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/jobs",
        params={"task": "double", "params": json.dumps({"bogus": 1})},
        content=CSV_BODY,
        headers={"Content-Type": "text/csv"},
    )
    await assert_refused(client, response, 422, "bogus")


async def test_bad_params_refuse_an_upload_before_its_body_is_read(
    client: httpx.AsyncClient,
) -> None:
    sent = []

    async def body() -> AsyncIterator[bytes]:
        yield b"a,b\n"
        for i in range(1000):
            sent.append(i)
            yield b"1,2\n" * 1000

    response = await client.post(
        "/jobs",
        params={"task": "double", "params": json.dumps({"bogus": 1})},
        content=body(),
        headers={"Content-Type": "text/csv"},
    )
    await assert_refused(client, response, 422, "bogus")
    assert len(sent) < 1000  # the answer came before the client had sent it all


@pytest.mark.parametrize(
    ("params", "word"),
    [
        ({"steps": [{"op": "explode", "columns": ["a"]}]}, "explode"),
        ({}, "steps"),
        ({"steps": []}, "steps"),
        ({"steps": [{"op": "filter", "column": "a", "cmp": "~=", "value": 1}]}, "cmp"),
        ({"steps": [{"op": "limit", "n": -1}]}, "n"),
        ({"steps": [{"op": "select"}]}, "columns"),
        ({"steps": [{"op": "sort", "by": ["a"], "bogus": True}]}, "bogus"),
    ],
)
async def test_bad_pipeline_params(
    client: httpx.AsyncClient, params: dict[str, Any], word: str
) -> None:
    response = await client.post("/jobs", json={"task": "pipeline", "params": params})
    await assert_refused(client, response, 422, word)


async def test_malformed_json(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/jobs",
        content=b'{"task": "double", "data": [',
        headers={"Content-Type": "application/json"},
    )
    await assert_refused(client, response, 400, "json")


@pytest.mark.parametrize(
    ("body", "word"),
    [
        ([{"task": "double"}], "object"),
        ("double", "object"),
        ({"task": "double", "data": [1, 2]}, "data"),
        ({"task": "double", "data": {"a": [1, 2]}}, "list"),
        ({"task": "double", "data": [{"a": 1}, "x"]}, "data"),
    ],
)
async def test_json_body_of_the_wrong_shape(
    client: httpx.AsyncClient, body: Any, word: str
) -> None:
    response = await client.post("/jobs", json=body)
    await assert_refused(client, response, 422, word)


@pytest.mark.parametrize("field", ["status", "attempts", "id", "result_url"])
async def test_unknown_top_level_field(client: httpx.AsyncClient, field: str) -> None:
    body = {"task": "double", "data": RECORDS, field: "succeeded" if field == "status" else 5}
    response = await client.post("/jobs", json=body)
    await assert_refused(client, response, 422, field)


async def test_unknown_query_option_value(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/jobs?task=double&priority=high", content=CSV_BODY, headers={"Content-Type": "text/csv"}
    )
    await assert_refused(client, response, 422, "priority")


@pytest.mark.parametrize(
    ("content", "word"),
    [
        (b"a,b\n1,2\n3,4,5,6\n", "expected 2 fields"),
        (b'a,b\n"1,2\n', "eof"),
        (b"a,b\n\xff\xfe,1\n", "utf-8"),
    ],
)
async def test_malformed_csv(client: httpx.AsyncClient, content: bytes, word: str) -> None:
    response = await client.post(
        "/jobs?task=double", content=content, headers={"Content-Type": "text/csv"}
    )
    assert response.status_code in (400, 422), response.text
    await assert_refused(client, response, response.status_code, "csv", word)


async def test_malformed_ndjson(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/jobs?task=double",
        content=b'{"a": 1}\n{"a": \n',
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert response.status_code in (400, 422), response.text
    await assert_refused(client, response, response.status_code, "ndjson")


async def test_ndjson_that_is_not_utf8_names_ndjson(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/jobs?task=double",
        content=b'{"a": "\xff"}\n',
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert response.status_code in (400, 422), response.text
    await assert_refused(client, response, response.status_code, "ndjson", "utf-8")


@pytest.mark.parametrize(
    "content_type", ["text/csv", "application/x-ndjson", "application/vnd.apache.parquet"]
)
async def test_empty_file(client: httpx.AsyncClient, content_type: str) -> None:
    response = await client.post(
        "/jobs?task=double", content=b"", headers={"Content-Type": content_type}
    )
    assert response.status_code in (400, 422), response.text
    await assert_refused(client, response, response.status_code, "empty")


async def test_empty_multipart_file(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/jobs", files={"file": ("input.csv", b"", "text/csv")}, data={"task": "double"}
    )
    assert response.status_code in (400, 422), response.text
    await assert_refused(client, response, response.status_code, "empty")


async def test_invalid_parquet_bytes(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/jobs?task=double",
        content=b"PAR1 this is not really parquet",
        headers={"Content-Type": "application/vnd.apache.parquet"},
    )
    assert response.status_code in (400, 422), response.text
    await assert_refused(client, response, response.status_code, "parquet")


async def test_params_query_that_is_not_json(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/jobs",
        params={"task": "double", "params": "{factor: 3"},
        content=CSV_BODY,
        headers={"Content-Type": "text/csv"},
    )
    await assert_refused(client, response, 400, "params", "json")


@pytest.mark.parametrize("params", ["[1, 2]", "3", '"factor"'])
async def test_params_query_that_is_not_an_object(client: httpx.AsyncClient, params: str) -> None:
    response = await client.post(
        "/jobs",
        params={"task": "double", "params": params},
        content=CSV_BODY,
        headers={"Content-Type": "text/csv"},
    )
    await assert_refused(client, response, 422, "params", "object")


async def test_multipart_params_that_are_not_json(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/jobs",
        files={"file": ("input.csv", CSV_BODY, "text/csv")},
        data={"task": "double", "params": "factor=3"},
    )
    await assert_refused(client, response, 400, "params", "json")


async def test_multipart_without_a_file_field(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/jobs",
        files={"upload": ("input.csv", CSV_BODY, "text/csv")},
        data={"task": "double"},
    )
    await assert_refused(client, response, 422, "file")


async def test_multipart_file_of_an_unknown_type(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/jobs",
        files={"file": ("input.bin", CSV_BODY, "application/octet-stream")},
        data={"task": "double"},
    )
    await assert_refused(client, response, 415, "application/octet-stream")


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "image/png"])
async def test_unsupported_content_type(client: httpx.AsyncClient, content_type: str) -> None:
    response = await client.post(
        "/jobs?task=double", content=CSV_BODY, headers={"Content-Type": content_type}
    )
    await assert_refused(client, response, 415, content_type)


async def test_missing_content_type(client: httpx.AsyncClient) -> None:
    response = await client.post("/jobs?task=double", content=CSV_BODY)
    assert "content-type" not in response.request.headers
    await assert_refused(client, response, 415, "content type")


# --- limits -------------------------------------------------------------------------------------


def _wide_records(columns: int, rows: int = 1) -> list[dict[str, int]]:
    return [{f"c{i}": i for i in range(columns)} for _ in range(rows)]


async def test_small_limit_still_accepts_a_small_body(small_client: httpx.AsyncClient) -> None:
    job = await submit(small_client, "double", data=_wide_records(SMALL_COLUMNS))
    assert (await wait_for_status(small_client, job["id"]))["status"] == "succeeded"


async def test_column_limit_still_accepts_that_many(narrow_client: httpx.AsyncClient) -> None:
    response = await narrow_client.post(
        "/jobs?task=double",
        content=pd.DataFrame(_wide_records(SMALL_COLUMNS)).to_csv(index=False).encode(),
        headers={"Content-Type": "text/csv"},
    )
    assert response.status_code == 202, response.text


async def test_json_body_over_the_size_limit(small_client: httpx.AsyncClient) -> None:
    records = [{"a": i, "b": "x" * 20} for i in range(60)]
    response = await small_client.post("/jobs", json={"task": "double", "data": records})
    assert len(response.request.content) > SMALL_LIMIT
    await assert_refused(small_client, response, 413, str(SMALL_LIMIT))


async def test_csv_body_over_the_size_limit(small_client: httpx.AsyncClient) -> None:
    content = b"a,b\n" + b"".join(f"{i},{i * 2}\n".encode() for i in range(300))
    assert len(content) > SMALL_LIMIT
    response = await small_client.post(
        "/jobs?task=double", content=content, headers={"Content-Type": "text/csv"}
    )
    await assert_refused(small_client, response, 413, str(SMALL_LIMIT))


@pytest.mark.parametrize("content_type", ["application/json", "text/csv"])
async def test_streamed_body_over_the_size_limit(
    small_client: httpx.AsyncClient, content_type: str
) -> None:
    """Without a Content-Length the limit holds while the body streams in."""

    async def chunks() -> AsyncIterator[bytes]:
        if content_type == "application/json":
            yield b'{"task": "double", "data": ['
            for i in range(200):
                yield b'{"a": %d},' % i
            yield b'{"a": 0}]}'
        else:
            yield b"a,b\n"
            for i in range(300):
                yield f"{i},{i}\n".encode()

    response = await small_client.post(
        "/jobs?task=double", content=chunks(), headers={"Content-Type": content_type}
    )
    assert "content-length" not in response.request.headers
    await assert_refused(small_client, response, 413, str(SMALL_LIMIT))


async def test_multipart_over_the_size_limit(small_client: httpx.AsyncClient) -> None:
    content = b"a\n" + b"1\n" * SMALL_LIMIT
    response = await small_client.post(
        "/jobs", files={"file": ("input.csv", content, "text/csv")}, data={"task": "double"}
    )
    await assert_refused(small_client, response, 413, str(SMALL_LIMIT))


async def test_too_many_columns_in_json(narrow_client: httpx.AsyncClient) -> None:
    response = await narrow_client.post(
        "/jobs", json={"task": "double", "data": _wide_records(SMALL_COLUMNS + 1)}
    )
    await assert_refused(narrow_client, response, 413, "columns", str(SMALL_COLUMNS))


@pytest.mark.parametrize("kind", ["csv", "ndjson", "parquet"])
async def test_too_many_columns_in_a_file(narrow_client: httpx.AsyncClient, kind: str) -> None:
    records = _wide_records(SMALL_COLUMNS + 1, rows=2)
    if kind == "csv":
        content, content_type = pd.DataFrame(records).to_csv(index=False).encode(), "text/csv"
    elif kind == "ndjson":
        content = "\n".join(json.dumps(record) for record in records).encode()
        content_type = "application/x-ndjson"
    else:
        content = parquet_bytes(pd.DataFrame(records))
        content_type = "application/vnd.apache.parquet"
    response = await narrow_client.post(
        "/jobs?task=double", content=content, headers={"Content-Type": content_type}
    )
    await assert_refused(narrow_client, response, 413, "columns", str(SMALL_COLUMNS))


# --- a large JSON body is read in a converter process, with the same outcome --------------------

BIG_RECORDS = [{"a": i, "b": i + 0.5} for i in range(4000)]
JSON = "application/json"


def big(body: dict[str, Any]) -> bytes:
    """``body`` as JSON past the size that is parsed on the event loop."""
    encoded = json.dumps(body).encode()
    assert len(encoded) > json_body.INLINE_BYTES
    return encoded


async def test_a_large_json_body_gives_the_same_job(client: httpx.AsyncClient) -> None:
    body = big({"task": "double", "params": {"factor": 3}, "priority": 4, "data": BIG_RECORDS})
    response = await client.post("/jobs", content=body, headers={"Content-Type": JSON})
    assert response.status_code == 202, response.text
    job = response.json()
    assert (job["params"], job["priority"]) == ({"factor": 3}, 4)
    tripled = [{"a": 3 * r["a"], "b": 3 * r["b"]} for r in BIG_RECORDS]
    assert await result_records(client, job["id"]) == tripled


async def test_a_json_body_of_unknown_length_is_read_too(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: sent chunked
        yield b'{"task": "double", '
        yield b'"data": ' + json.dumps(RECORDS).encode() + b"}"

    response = await client.post("/jobs", content=chunks(), headers={"Content-Type": JSON})
    assert response.status_code == 202, response.text
    assert await result_records(client, response.json()["id"]) == DOUBLED


@pytest.mark.parametrize(
    "extra",
    [{"status": "succeeded"}, {"priority": "high"}, {"task": ""}, {"params": [1]}],
)
async def test_a_large_body_of_the_wrong_shape_is_refused_as_a_small_one(
    client: httpx.AsyncClient, extra: dict[str, Any]
) -> None:
    small = await client.post("/jobs", json={"task": "double", "data": RECORDS, **extra})
    large_body = big({"task": "double", "data": BIG_RECORDS, **extra})
    large = await client.post("/jobs", content=large_body, headers={"Content-Type": JSON})
    assert small.status_code == 422, small.text
    assert (large.status_code, large.json()) == (small.status_code, small.json())
    await assert_refused(client, large, 422, next(iter(extra)))


async def test_a_large_body_that_is_not_json_is_a_400(client: httpx.AsyncClient) -> None:
    truncated = big({"task": "double", "data": BIG_RECORDS})[:-5]
    response = await client.post("/jobs", content=truncated, headers={"Content-Type": JSON})
    await assert_refused(client, response, 400, "not valid json")


async def test_a_large_body_over_the_cell_limit_is_a_413(database_url: str) -> None:
    records = [*BIG_RECORDS, {"a": 0, "b": 0.0, "s": "x" * 40}]
    body = big({"task": "double", "data": records})
    async with serve(database_url, max_cell_chars=20) as http:
        response = await http.post("/jobs", content=body, headers={"Content-Type": JSON})
        await assert_refused(http, response, 413, "'s'", "40 characters")


async def test_an_idempotency_key_replays_a_large_body(client: httpx.AsyncClient) -> None:
    body = big({"task": "double", "data": BIG_RECORDS})
    headers = {"Content-Type": JSON, "Idempotency-Key": "big-1"}
    first = await client.post("/jobs", content=body, headers=headers)
    second = await client.post("/jobs", content=body, headers=headers)
    assert (first.status_code, second.status_code) == (202, 200), second.text
    assert second.json()["id"] == first.json()["id"]
    # Other records under the key conflict, whichever way each body was read.
    records = await client.post(
        "/jobs",
        json={"task": "double", "data": BIG_RECORDS[:2]},
        headers={"Idempotency-Key": "big-1"},
    )
    assert records.status_code == 409, records.text
    assert await job_ids(client) == [first.json()["id"]]
