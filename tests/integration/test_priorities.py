"""Tasks and upload parsing run at a lower priority than the API, which keeps its core."""

from __future__ import annotations

import os

import httpx
import pytest

from jobsvc.converter import ConverterPool
from jobsvc.processes import NICENESS
from tests.conftest import submit, wait_for_status

EXPECTED = min(19, os.nice(0) + NICENESS)


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_tasks_run_niced(client: httpx.AsyncClient) -> None:
    job = await submit(client, "niceness", data=[{"a": 1}])
    assert (await wait_for_status(client, job["id"]))["status"] == "succeeded"
    result = await client.get(f"/jobs/{job['id']}/result")
    assert result.json() == {"nice": EXPECTED}


async def test_the_converter_processes_run_niced() -> None:
    pool = ConverterPool(1)
    try:
        assert await pool.run(os.nice, 0) == EXPECTED
    finally:
        pool.shutdown()
