"""The backoff policy: how long a failed attempt waits before the next one. Pure."""

from __future__ import annotations

import random


def backoff_seconds(base: float, attempt: int, cap: float, jitter: float | None = None) -> float:
    """About ``base`` after the first attempt, twice that after the second, ... up to ``cap``.

    ``jitter`` in [0, 1) spreads retries that failed together: the delay lies between half
    and all of the doubled base. Drawn at random unless given (tests give it).
    """
    if jitter is None:
        jitter = random.random()  # noqa: S311 - spreading retries, not security
    delay = min(cap, base * 2.0 ** max(0, attempt - 1))
    return delay / 2 + delay / 2 * jitter
