"""Wake-ups across instances on PostgreSQL: ``LISTEN`` on the jobs channel.

A submit on any instance sends ``NOTIFY`` in its transaction; every runner listening
claims at once instead of at its next poll. The poll stays as the fallback: a notification
lost while the listening connection was down costs one poll interval, nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import make_url

from jobsvc.loops import BackgroundLoop
from jobsvc.repository import JOBS_CHANNEL

log = logging.getLogger("jobsvc.listen")
_RECONNECT_SECONDS = 1.0


class JobListener:
    def __init__(self, database_url: str, on_notify: Callable[[], None]) -> None:
        url = make_url(database_url).set(drivername="postgresql")
        self._dsn = url.render_as_string(hide_password=False)
        self._on_notify = on_notify
        self._loop = BackgroundLoop("jobsvc-listen", self._listen_forever)

    async def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def _listen_forever(self) -> None:
        import asyncpg

        while True:
            closed = asyncio.Event()
            try:
                conn = await asyncpg.connect(self._dsn, timeout=10)
            except (OSError, asyncpg.PostgresError) as error:
                log.warning("cannot listen for new jobs (%s); polling meanwhile", error)
                await asyncio.sleep(_RECONNECT_SECONDS)
                continue
            try:
                conn.add_termination_listener(lambda _conn, closed=closed: closed.set())
                await conn.add_listener(JOBS_CHANNEL, self._notified)
                self._on_notify()  # whatever was announced while we were not listening
                await closed.wait()
                log.warning("the listening connection closed; reconnecting")
            finally:
                with contextlib.suppress(Exception):
                    await conn.close(timeout=2)
            await asyncio.sleep(_RECONNECT_SECONDS)

    def _notified(self, *_: Any) -> None:
        self._on_notify()
