"""The built-in ``pipeline`` task through the real API: upload, run in a worker, fetch."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import httpx
import pandas as pd

from tests.conftest import submit, wait_for_status

PARQUET = "application/vnd.apache.parquet"
SALES_CSV = (
    b"region,product,units,price\n"
    b"north,apple,5,1.5\n"
    b"south,apple,0,1.5\n"
    b"north,pear,12,2.25\n"
    b"east,plum,7,0.75\n"
    b"south,pear,3,2.25\n"
    b"east,apple,9,1.5\n"
    b"north,plum,1,0.75\n"
    b"west,pear,0,2.25\n"
)


async def run_pipeline_on_csv(
    client: httpx.AsyncClient, content: bytes, steps: list[dict[str, Any]]
) -> dict[str, Any]:
    response = await client.post(
        "/jobs",
        params={"task": "pipeline", "params": json.dumps({"steps": steps}), "max_attempts": 1},
        content=content,
        headers={"Content-Type": "text/csv"},
    )
    assert response.status_code == 202, response.text
    return await wait_for_status(client, response.json()["id"])


async def parquet_result(client: httpx.AsyncClient, job: dict[str, Any]) -> pd.DataFrame:
    assert job["status"] == "succeeded", job
    response = await client.get(job["result_url"], headers={"Accept": PARQUET})
    assert response.status_code == 200, response.text
    return pd.read_parquet(io.BytesIO(response.content))


async def test_filter_sort_group_by_equals_pandas(client: httpx.AsyncClient) -> None:
    steps: list[dict[str, Any]] = [
        {"op": "filter", "column": "product", "cmp": "in", "value": ["apple", "pear"]},
        {"op": "sort", "by": ["units"], "descending": True},
        {"op": "group_by", "by": ["product"], "aggregations": {"price": ["max"], "units": ["sum"]}},
    ]
    job = await run_pipeline_on_csv(client, SALES_CSV, steps)
    got = await parquet_result(client, job)

    frame = pd.read_csv(io.BytesIO(SALES_CSV))
    kept = frame[frame["product"].isin(["apple", "pear"])].sort_values("units", ascending=False)
    expected = (
        kept.groupby("product")
        .agg(price_max=("price", "max"), units_sum=("units", "sum"))
        .reset_index()
    )
    pd.testing.assert_frame_equal(got, expected, check_dtype=False)
    assert got["units_sum"].tolist() == [14, 15]


async def test_filter_group_by_sort_equals_pandas(client: httpx.AsyncClient) -> None:
    steps: list[dict[str, Any]] = [
        {"op": "filter", "column": "units", "cmp": ">", "value": 0},
        {"op": "group_by", "by": ["region"], "aggregations": {"units": ["sum", "mean", "count"]}},
        {"op": "sort", "by": ["units_sum"], "descending": True},
    ]
    job = await run_pipeline_on_csv(client, SALES_CSV, steps)
    got = await parquet_result(client, job)

    frame = pd.read_csv(io.BytesIO(SALES_CSV))
    kept = frame[frame["units"] > 0]
    expected = (
        kept.groupby("region")
        .agg(
            units_sum=("units", "sum"),
            units_mean=("units", "mean"),
            units_count=("units", "count"),
        )
        .reset_index()
        .sort_values("units_sum", ascending=False, kind="stable")
        .reset_index(drop=True)
    )
    assert got["region"].tolist() == ["north", "east", "south"]
    pd.testing.assert_frame_equal(got, expected, check_dtype=False)
    # The JSON rendering of the same result carries the same values.
    as_json = (await client.get(job["result_url"])).json()
    assert as_json == expected.to_dict(orient="records")


async def test_select_rename_cast_on_a_json_submit(client: httpx.AsyncClient) -> None:
    records = [{"a": "1", "b": "x", "c": 0}, {"a": "2", "b": "y", "c": 1}]
    job = await submit(
        client,
        "pipeline",
        data=records,
        params={
            "steps": [
                {"op": "select", "columns": ["b", "a"]},
                {"op": "rename", "columns": {"a": "n"}},
                {"op": "cast", "columns": {"n": "int"}},
            ]
        },
    )
    done = await wait_for_status(client, job["id"])
    got = await parquet_result(client, done)
    assert got.columns.tolist() == ["b", "n"]
    assert got["n"].tolist() == [1, 2]
    assert str(got["n"].dtype) == "Int64"


async def test_a_step_naming_a_missing_column_fails_the_job(client: httpx.AsyncClient) -> None:
    steps: list[dict[str, Any]] = [
        {"op": "filter", "column": "units", "cmp": ">", "value": 0},
        {"op": "group_by", "by": ["county"], "aggregations": {"units": ["sum"]}},
    ]
    job = await run_pipeline_on_csv(client, SALES_CSV, steps)
    assert job["status"] == "failed"
    assert job["attempts"] == 1
    assert job["result_url"] is None
    message = job["error"]["message"]
    assert "'county'" in message
    assert "step 1 (group_by)" in message
    assert "region" in message  # the columns that do exist, to help the user


async def test_a_missing_column_after_a_rename_names_the_old_name(
    client: httpx.AsyncClient,
) -> None:
    steps: list[dict[str, Any]] = [
        {"op": "rename", "columns": {"units": "qty"}},
        {"op": "sort", "by": ["units"]},
    ]
    job = await run_pipeline_on_csv(client, SALES_CSV, steps)
    assert job["status"] == "failed"
    assert "'units'" in job["error"]["message"]
    assert "qty" in job["error"]["message"]


async def test_injection_payloads_are_plain_strings(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    target = tmp_path / "pwned"
    payload = f"@__import__('os').system('touch {target}')"
    backtick = f"`{payload}`"
    records = [
        {"name": payload, payload: 1, "v": 1},
        {"name": "plain", payload: 2, "v": 2},
        {"name": backtick, payload: 3, "v": 3},
    ]
    steps: list[dict[str, Any]] = [
        {"op": "filter", "column": "name", "cmp": "==", "value": payload},
        {"op": "filter", "column": payload, "cmp": ">=", "value": 1},
        {"op": "sort", "by": [payload]},
        {"op": "group_by", "by": [payload], "aggregations": {"v": ["sum"]}},
    ]
    job = await submit(client, "pipeline", data=records, params={"steps": steps})
    done = await wait_for_status(client, job["id"])
    assert done["status"] == "succeeded", done
    got = (await client.get(done["result_url"])).json()
    assert got == [{payload: 1, "v_sum": 1}]
    assert not target.exists()


async def test_injection_payload_as_a_missing_column_runs_nothing(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    target = tmp_path / "pwned"
    payload = f"@__import__('os').system('touch {target}')"
    steps: list[dict[str, Any]] = [
        {"op": "filter", "column": payload, "cmp": "contains", "value": payload},
        {"op": "select", "columns": ["region"]},
    ]
    job = await run_pipeline_on_csv(client, SALES_CSV, steps)
    assert job["status"] == "failed"
    assert payload in job["error"]["message"]
    assert not target.exists()
    contains: list[dict[str, Any]] = [
        {"op": "filter", "column": "region", "cmp": "contains", "value": payload}
    ]
    job = await run_pipeline_on_csv(client, SALES_CSV, contains)
    assert (await parquet_result(client, job)).empty
    assert not target.exists()


async def test_a_data_error_fails_the_job_at_once(client: httpx.AsyncClient) -> None:
    """Retrying cannot bring a missing column back: the first attempt is the last."""
    response = await client.post(
        "/jobs",
        json={
            "task": "pipeline",
            "params": {"steps": [{"op": "select", "columns": ["nope"]}]},
            "data": [{"a": 1}],
            "max_attempts": 5,
        },
    )
    job = await wait_for_status(client, response.json()["id"])
    assert (job["status"], job["attempts"]) == ("failed", 1)
    assert job["error"]["type"] == "MissingColumnError"
    assert "'nope'" in job["error"]["message"]
