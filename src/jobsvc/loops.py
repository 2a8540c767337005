"""``BackgroundLoop``: a service's coroutine run as one task, from ``start`` until ``stop``.

The runner's parts (the heartbeat, each producer, each maintenance service) and the
PostgreSQL listener are each one such loop; stopping one cancels it and waits until it has
ended, so nothing it does outlives its service.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any


class BackgroundLoop:
    def __init__(self, name: str, body: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self.name = name
        self._body = body
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._body(), name=self.name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
