"""What every part of one runner shares: its settings, its database, its batched writes, and
the id its leases carry (``lease_owner``: host, pid and a token per start)."""

from __future__ import annotations

from dataclasses import dataclass

from jobsvc.db import Database
from jobsvc.runner.writes import WriteBatch
from jobsvc.settings import Settings


@dataclass(frozen=True)
class RunnerContext:
    settings: Settings
    db: Database
    writes: WriteBatch
    runner_id: str
