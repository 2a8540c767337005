"""The body of a JSON submit, checked and its records encoded: in place when it is small, in a
converter process when it is not.

Parsing JSON holds the interpreter. A body of a few megabytes would stall every other request
for a tenth of a second, so a body over ``INLINE_BYTES`` (or of unknown length) streams to a
temporary file and a converter process reads it. Both ways run ``read`` below, so a job's
stored input, and every refusal, is the same whatever the body's size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from jobsvc import formats
from jobsvc.errors import TooLarge, problems
from jobsvc.schemas import SubmitJSON, SubmitOptions

INLINE_BYTES = 64 * 1024  # parsed on the event loop: about 2 ms of JSON
# pydantic's JSON parser (jiter) refuses a value nested deeper than this below the top level
# as it meets it, before it builds anything: memory and the stack stay bounded.
MAX_DEPTH = 200


@dataclass(frozen=True)
class ReadBody:
    """The submit's options and records, or why the body was refused."""

    options: SubmitOptions | None = None
    records: formats.EncodedRecords | None = None
    not_json: str | None = None  # the parser's complaint, when the body is not JSON
    problems: list[dict[str, Any]] | None = None  # JSON of the wrong shape, field by field


def read(raw: bytes, limits: formats.Limits) -> ReadBody:
    """Check a body; the records over a limit raise ``TooLarge``."""
    try:
        body = SubmitJSON.model_validate_json(raw)
    except ValidationError as error:
        found = problems(error, "body")
        if any(problem["type"] == "json_invalid" for problem in found):
            check_depth(found[0]["msg"], "the JSON body")
            return ReadBody(not_json=found[0]["msg"])
        return ReadBody(problems=found)
    records = formats.encode_records(body.data, limits)
    return ReadBody(options=body.model_copy(update={"data": []}), records=records)


def check_depth(complaint: str, what: str) -> None:
    """``TooLarge`` naming the limit when the JSON parser's ``complaint`` is its nesting."""
    if "recursion limit exceeded" in complaint:
        where = complaint.rpartition("exceeded ")[2]
        raise TooLarge(
            f"{what} is nested more than {MAX_DEPTH} levels deep ({where}); "
            f"the limit is {MAX_DEPTH} levels"
        )


def read_file(path: str, limits: formats.Limits) -> ReadBody:
    """``read`` of a body saved to a file (this runs in a converter process)."""
    return read(Path(path).read_bytes(), limits)


__all__ = ["INLINE_BYTES", "MAX_DEPTH", "ReadBody", "check_depth", "read", "read_file"]
