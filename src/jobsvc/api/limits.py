"""The request body limit, enforced while the body streams in, for every kind of request."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobsvc.api.errors import error_response
from jobsvc.errors import TooLarge, UnsupportedMediaType


def too_large(limit: int) -> TooLarge:
    return TooLarge(f"the request body is larger than the limit of {limit} bytes")


class BodySizeLimit:
    """Refuses a body over ``max_bytes``: at once by its Content-Length, else as it arrives."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await error_response(too_large(self.max_bytes))(scope, receive, send)
                return
            if name == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
                # A compressed body's size says nothing of what it inflates to: refuse it.
                encoding = value.decode(errors="replace")
                refusal = UnsupportedMediaType(
                    f"compressed request bodies (Content-Encoding: {encoding}) are not "
                    "accepted; send the data uncompressed"
                )
                await error_response(refusal)(scope, receive, send)
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised inside the route that reads the body; its route class answers 413.
                    raise too_large(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)
