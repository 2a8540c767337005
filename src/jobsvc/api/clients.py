"""Clients that stall or go away (``JOBSVC_REQUEST_IDLE_SECONDS``).

uvicorn waits for a request's headers, and for the next piece of its body, as long as the
client likes: a client that sends them slowly, or stops halfway, holds a connection, a task and
an upload file forever. Here a request's headers must arrive within the limit (the server's
protocol, ``with_header_deadline``), and its body may not pause longer than the limit
(``IdleBodyTimeout``, ASGI): the route then unwinds as for a disconnect (nothing stored, an
upload's file removed), the client gets ``408`` and the connection is closed.

A client that disconnects mid-upload is one info line, not uvicorn's "Exception in ASGI
application" traceback: it is the client's doing, not a fault of the service.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("jobsvc.http")


def _who(scope: Scope) -> str:
    client = scope.get("client")
    address = f"{client[0]}:{client[1]}" if client else "a client"
    return f"{address} ({scope['method']} {scope['path']})"


class IdleBodyTimeout:
    """A request whose body stops arriving for ``idle_seconds`` ends in ``408`` and a closed
    connection; a client that disconnects while sending one is logged in one line."""

    def __init__(self, app: ASGIApp, idle_seconds: float) -> None:
        self.app = app
        self.idle_seconds = idle_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_done = idle = False

        async def receive_in_time() -> Message:
            nonlocal body_done, idle
            if body_done:  # what is left is a disconnect, whenever it comes: no deadline
                return await receive()
            if idle:
                return {"type": "http.disconnect"}
            try:
                async with asyncio.timeout(self.idle_seconds):
                    message = await receive()
            except TimeoutError:
                # Given to the route as a disconnect: it unwinds the way it does for one.
                idle = True
                return {"type": "http.disconnect"}
            body_done = message["type"] != "http.request" or not message.get("more_body")
            return message

        try:
            await self.app(scope, receive_in_time, send)
        except ClientDisconnect:
            if not idle:
                log.info("%s went away before its request was answered; dropped", _who(scope))
                return
            # A body is read before its answer starts: no answer has started yet.
            log.info(
                "%s sent no request body for %g s; answered 408 and closed the connection",
                _who(scope),
                self.idle_seconds,
            )
            timed_out = JSONResponse(
                {"detail": f"no request body for {self.idle_seconds:g} s; nothing was stored"},
                status_code=408,
                headers={"Connection": "close"},
            )
            await timed_out(scope, receive, send)


def with_header_deadline(seconds: float) -> type[HttpToolsProtocol]:
    """uvicorn's HTTP/1.1 protocol (httptools) that closes a connection whose request headers
    are not complete ``seconds`` after it opened, or after the previous response. Each byte
    does not reset the clock: a byte every few seconds does not keep a connection."""

    class HeaderDeadline(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._start_header_clock()

        def on_headers_complete(self) -> None:
            self._stop_header_clock()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # Armed only when the connection now waits for a next request (a pipelined one
            # has its headers already); the keep-alive timeout ends it if nothing comes.
            if self.timeout_keep_alive_task is not None:
                self._start_header_clock()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_header_clock()
            super().connection_lost(exc)

        def _start_header_clock(self) -> None:
            self._stop_header_clock()
            self._header_timer = self.loop.call_later(seconds, self._headers_too_slow)

        def _stop_header_clock(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                address = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
                log.info(
                    "%s did not send its request headers within %g s; connection closed",
                    address,
                    seconds,
                )
                self.transport.close()

    return HeaderDeadline
