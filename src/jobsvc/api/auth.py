"""API keys: who is asking, and whose jobs they may see.

With ``JOBSVC_API_KEYS`` unset the service is open (a developer's machine) and every job
belongs to the owner ``""``. With keys set, every request but ``GET /healthz`` needs
``Authorization: Bearer <key>``; a job belongs to the key that submitted it, stored as a
fingerprint of the key (never the key itself), and other keys' jobs do not exist for it.
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from jobsvc.api.errors import error_response
from jobsvc.errors import Unauthorized

OPEN_OWNER = ""
PUBLIC_PATHS = frozenset({"/healthz"})


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
