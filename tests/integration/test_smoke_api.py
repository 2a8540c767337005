from __future__ import annotations

import httpx

from tests.conftest import submit, wait_for_status


async def test_summarize_end_to_end(client: httpx.AsyncClient) -> None:
    job = await submit(client, "summarize", data=[{"a": 1}, {"a": 2}])
    done = await wait_for_status(client, job["id"])
    assert done["status"] == "succeeded"
    result = (await client.get(f"/jobs/{job['id']}/result")).json()
    assert result["rows"] == 2
    assert result["columns"]["a"]["mean"] == 1.5
