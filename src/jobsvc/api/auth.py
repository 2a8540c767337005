"""API keys: who is asking, and whose jobs they may see.

With ``JOBSVC_API_KEYS`` unset the service is open (a developer's machine) and every job
belongs to the owner ``""``. With keys set, every request but ``GET /healthz`` needs
``Authorization: Bearer <key>``; a job belongs to the key that submitted it, stored as a
fingerprint of the key (never the key itself), and other keys' jobs do not exist for it.
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import urlsplit

from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from jobsvc.api.errors import error_response
from jobsvc.errors import Unauthorized

OPEN_OWNER = ""
PUBLIC_PATHS = frozenset({"/healthz"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def fingerprint(key: str) -> str:
    """The owner id of a key: stable, not secret, not reversible."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


class KeyRing:
    def __init__(self, keys: list[str]) -> None:
        self._keys = [(key.encode(), fingerprint(key)) for key in keys if key]

    @property
    def open(self) -> bool:
        return not self._keys

    def owner_of(self, authorization: str | None) -> str:
        """The owner id for an ``Authorization`` header; ``Unauthorized`` if it has no key."""
        if self.open:
            return OPEN_OWNER
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise Unauthorized("this service needs an API key: Authorization: Bearer <key>")
        presented = given.strip().encode()
        owner = None
        for key, key_owner in self._keys:
            # Compare with every key, in constant time, so timing tells nothing.
            if hmac.compare_digest(presented, key):
                owner = key_owner
        if owner is None:
            raise Unauthorized("the API key is not valid")
        return owner

    def owner(self, connection: HTTPConnection) -> str:
        return self.owner_of(connection.headers.get("authorization"))


class RequireKey:
    """Every request but the public paths needs a valid key (the docs and the UI too)."""

    def __init__(self, app: ASGIApp, keys: KeyRing) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.keys.open and scope["path"] not in PUBLIC_PATHS:
            try:
                self.keys.owner(HTTPConnection(scope))
            except Unauthorized as error:
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def same_origin(connection: HTTPConnection) -> bool:
    """False for a request a browser sent on another site's behalf (a forged form post).

    Browsers send ``Origin`` with every POST and ``Sec-Fetch-Site`` with every request; a
    client that sends neither (curl, the CLI) is not a browser that could have been tricked.
    """
    if connection.headers.get("sec-fetch-site") == "cross-site":
        return False
    origin = connection.headers.get("origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc == connection.headers.get("host", "")


class RefuseCrossSite:
    """Cancel and retry take no body, so any web page could post them from a visitor's
    browser to an open service: unsafe methods from another site are refused (403)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in SAFE_METHODS:
            connection = HTTPConnection(scope)
            if not same_origin(connection):
                response = JSONResponse(
                    {"detail": "cross-site requests may not change jobs"}, status_code=403
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
