"""/metrics: the job table's figures and this instance's attempt counters, in Prometheus text."""

from __future__ import annotations

from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import submit, wait_for_status


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_metrics_follow_the_jobs(client: httpx.AsyncClient, tmp_path: Path) -> None:
    ok = await submit(client, "double", data=[{"a": 1}])
    bad = await submit(client, "boom", params={"message": "no"}, max_attempts=1)
    await wait_for_status(client, ok["id"])
    await wait_for_status(client, bad["id"])
    gate = tmp_path / "gate"
    held = await submit(client, "wait_for_file", params={"path": str(gate)})
    await wait_for_status(client, held["id"], "running")
    waiting = await submit(client, "double", data=[{"a": 2}])

    samples = await scrape(client)
    assert samples[("jobsvc_jobs", (("status", "succeeded"),))] == 1
    assert samples[("jobsvc_jobs", (("status", "failed"),))] == 1
    assert samples[("jobsvc_jobs", (("status", "running"),))] == 1
    assert samples[("jobsvc_queue_depth", ())] == 1
    assert samples[("jobsvc_oldest_queued_age_seconds", ())] >= 0
    assert (
        samples[("jobsvc_attempt_failures_total", (("error_type", "ValueError"), ("task", "boom")))]
        == 1
    )
    assert (
        samples[
            (
                "jobsvc_attempt_duration_seconds_count",
                (("outcome", "succeeded"), ("task", "double")),
            )
        ]
        == 1
    )
    assert samples[("jobsvc_submitted_jobs_total", ())] == 4

    gate.touch()
    await wait_for_status(client, waiting["id"])
    samples = await scrape(client)
    assert samples[("jobsvc_queue_depth", ())] == 0
    assert samples[("jobsvc_oldest_queued_age_seconds", ())] == 0
    assert samples[("jobsvc_jobs", (("status", "succeeded"),))] == 3
