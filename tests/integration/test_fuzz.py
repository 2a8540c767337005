"""The API fuzzed from its own OpenAPI document: whatever schemathesis sends, no 5xx, and every
response fits the documented status codes, content types and schemas."""

from __future__ import annotations

from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.live_server import LiveServer

EXAMPLES_PER_OPERATION = 40


def test_api_conforms_to_its_schema(tmp_path: Path) -> None:
    with LiveServer(f"sqlite+aiosqlite:///{tmp_path / 'jobsvc.db'}", tmp_path / "log") as server:
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        labels = {operation.label for operation in operations}
        assert {"POST /jobs", "GET /jobs/{job_id}/result", "GET /metrics"} <= labels

        for operation in operations:

            @given(case=operation.as_strategy())
            @settings(
                max_examples=EXAMPLES_PER_OPERATION,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def conforms(case: schemathesis.Case) -> None:
                # A schema-valid body may still name a task that does not exist, or params a
                # task refuses: a 422 for those is the contract, not a failure.
                case.call_and_validate(excluded_checks=[positive_data_acceptance])

            conforms()
