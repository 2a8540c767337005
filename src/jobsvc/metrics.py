"""Prometheus metrics, one registry per service (two apps in a process never mix figures).

Counters and the duration histogram are updated by the runner as attempts end; the job
counts by state, the queue depth and the age of the oldest queued job are read from the
database when ``/metrics`` is scraped, so every instance reports the shared table alike.
"""

from __future__ import annotations

from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Gauge(
            "jobsvc_jobs", "Jobs in the table, by state.", ["status"], registry=self.registry
        )
        self.queue_depth = Gauge(
            "jobsvc_queue_depth",
            "Jobs waiting to run (queued or retrying).",
            registry=self.registry,
        )
        self.oldest_queued_age = Gauge(
            "jobsvc_oldest_queued_age_seconds",
            "Age of the oldest queued job (0 when none waits).",
            registry=self.registry,
        )
        self.attempt_duration = Histogram(
            "jobsvc_attempt_duration_seconds",
            "How long attempts ran, by task and outcome.",
            ["task", "outcome"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
            registry=self.registry,
        )
        self.failures = Counter(
            "jobsvc_attempt_failures",
            "Failed attempts, by task and error type.",
            ["task", "error_type"],
            registry=self.registry,
        )
        self.rescues = Counter(
            "jobsvc_rescued_jobs",
            "Running jobs taken back from a lost worker by this instance's rescuer.",
            registry=self.registry,
        )
        self.submitted = Counter(
            "jobsvc_submitted_jobs", "Jobs accepted by this instance.", registry=self.registry
        )

    def observe_attempt(
        self, task: str, seconds: float, outcome: str, error_type: str | None = None
    ) -> None:
        self.attempt_duration.labels(task=task, outcome=outcome).observe(seconds)
        if error_type is not None:
            self.failures.labels(task=task, error_type=error_type).inc()

    def render(
        self, counts: dict[str, int], oldest_queued: datetime | None, now: datetime
    ) -> bytes:
        for status, count in counts.items():
            self.jobs.labels(status=status).set(count)
        self.queue_depth.set(counts.get("queued", 0) + counts.get("retrying", 0))
        age = (now - oldest_queued).total_seconds() if oldest_queued else 0.0
        self.oldest_queued_age.set(max(0.0, age))
        return generate_latest(self.registry)
