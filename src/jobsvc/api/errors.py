"""Domain errors as HTTP responses, in one place.

The mapping lives in the routers' route class rather than in app-level exception handlers, so
the job routes answer the same when a user mounts them in an app of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from jobsvc import errors

STATUS: dict[type[errors.JobsvcError], int] = {
    errors.Unauthorized: 401,
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.MalformedRequest: 400,
    errors.InvalidInput: 422,
    errors.TooLarge: 413,
    errors.UnsupportedMediaType: 415,
    errors.NotAcceptable: 406,
    errors.StorageUnavailable: 503,
}
RETRY_AFTER_SECONDS = "1"


def status_of(error: errors.JobsvcError) -> int:
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def error_response(error: errors.JobsvcError) -> JSONResponse:
    status = status_of(error)
    headers = None
    if status == 503:
        headers = {"Retry-After": RETRY_AFTER_SECONDS}
    elif status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse({"detail": error.detail}, status_code=status, headers=headers)


class JobsvcRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except errors.JobsvcError as error:
                return error_response(error)

        return handle
