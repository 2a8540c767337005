"""Domain errors. Each one's docstring is its default message; the HTTP layer maps each class
to a status in one place (``jobsvc.api.errors``).

    JobsvcError
    ├── Unauthorized             no API key, or a wrong one
    ├── NotFound                 the job does not exist (or belongs to another key)
    ├── Conflict                 the job's state forbids the operation
    │   └── IdempotencyConflict  same Idempotency-Key, different request
    ├── InvalidInput             the request names something that cannot be run
    │   ├── MalformedRequest     the body is not well-formed (bad JSON)
    │   ├── UnknownTask
    │   ├── InvalidParams
    │   └── InvalidData          malformed or unsupported input data
    ├── TooLarge                 the upload is over a limit
    │   └── NeedsMoreMemory      its conversion needs more memory than one may take
    ├── UnsupportedMediaType
    ├── NotAcceptable            the result cannot be given in the asked format
    └── StorageUnavailable       the database cannot be used now (unreachable, locked, full)
        ├── DatabaseBusy         another writer held the lock past the busy timeout
        └── WritesRefused        the disk is full or read-only: writes fail until it clears
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


class JobsvcError(Exception):
    """Something went wrong in jobsvc."""

    def __init__(self, message: str | None = None, *, detail: Any = None) -> None:
        self.message = message or (self.__doc__ or type(self).__name__).strip()
        self.detail = detail if detail is not None else self.message
        super().__init__(self.message)


class Unauthorized(JobsvcError):
    """A valid API key is needed: Authorization: Bearer <key>."""


class NotFound(JobsvcError):
    """No such job."""


class Conflict(JobsvcError):
    """The job's state does not allow this."""


class IdempotencyConflict(Conflict):
    """This Idempotency-Key was used for a different request."""


class InvalidInput(JobsvcError):
    """The request cannot be run as given."""


class MalformedRequest(InvalidInput):
    """The request body is not well-formed."""


class UnknownTask(InvalidInput):
    """No task has this name."""


class InvalidParams(InvalidInput):
    """The params do not fit the task."""


class InvalidData(InvalidInput):
    """The input data cannot be read."""


class TooLarge(JobsvcError):
    """The request is larger than the service accepts."""


class NeedsMoreMemory(TooLarge):
    """The input needs more memory to convert than the service allows one conversion."""


class UnsupportedMediaType(JobsvcError):
    """This content type is not accepted."""


class NotAcceptable(JobsvcError):
    """The result cannot be given in the requested format."""


class StorageUnavailable(JobsvcError):
    """The database cannot be used right now; nothing was changed. Try again later."""


class DatabaseBusy(StorageUnavailable):
    """The database is busy with another writer; nothing was changed. Try again shortly."""


class WritesRefused(StorageUnavailable):
    """The database cannot take writes (its disk is full or read-only); nothing was changed.
    Try again later."""


def problems(error: ValidationError, where: str) -> list[dict[str, Any]]:
    """pydantic's errors as an API ``detail`` list, each located under ``where``."""
    return [
        {"loc": [where, *problem["loc"]], "msg": problem["msg"], "type": problem["type"]}
        for problem in error.errors(include_url=False, include_context=False)
    ]
