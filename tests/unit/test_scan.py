"""The streaming line check: every line measured as its bytes pass, however they are chunked."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobsvc.errors import TooLarge
from jobsvc.scan import LineScanner, characters, check_lines

MAX_CHARS = 100
MAX_FIELDS = 5


def scan(
    data: bytes,
    chunk: int = 1 << 20,
    max_fields: int | None = MAX_FIELDS,
    max_chars: int = MAX_CHARS,
) -> None:
    scanner = LineScanner(max_chars, max_fields)
    for start in range(0, len(data), chunk):
        scanner.feed(data[start : start + chunk])


def refusal(
    data: bytes,
    chunk: int = 1 << 20,
    max_fields: int | None = MAX_FIELDS,
    max_chars: int = MAX_CHARS,
) -> str:
    with pytest.raises(TooLarge) as refused:
        scan(data, chunk, max_fields, max_chars)
    return str(refused.value)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
@pytest.mark.parametrize("end", [b"\n", b"\r\n", b"\r"])
def test_lines_within_the_limits_pass_whatever_their_ends_and_chunks(
    chunk: int, end: bytes
) -> None:
    lines = [b"a,b,c,d,e", b"x" * MAX_CHARS, "é".encode() * MAX_CHARS, b"", b"1,2"]
    scan(end.join(lines) + end, chunk)
    scan(end.join(lines), chunk)  # the last line unended


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_a_long_line_is_refused_naming_it_and_the_limit(chunk: int) -> None:
    message = refusal(b"a\n1\n" + b"b" * (MAX_CHARS + 1) + b"\n2\n", chunk)
    assert "line 3" in message
    assert f"{MAX_CHARS} characters" in message


def test_characters_are_counted_not_bytes() -> None:
    scan("é".encode() * MAX_CHARS + b"\n")
    assert "line 1" in refusal("é".encode() * (MAX_CHARS + 1) + b"\n")
    assert characters("aé€😀".encode()) == 4


def test_a_line_that_never_ends_is_refused_once_past_the_limit() -> None:
    scanner = LineScanner(MAX_CHARS, MAX_FIELDS)
    fed = 0

    def endless() -> Iterator[None]:
        nonlocal fed
        while True:
            scanner.feed(b"1" * 16)
            fed += 16
            yield None

    with pytest.raises(TooLarge):
        list(endless())
    assert fed <= MAX_CHARS


def test_a_line_of_too_many_fields_is_refused() -> None:
    scan(b"a,b,c,d,e\n1,2,3,4,5\n")
    message = refusal(b"a,b,c,d,e\n1,2,3,4,5,6\n")
    assert "line 2 has 6 fields" in message
    assert f"the limit is {MAX_FIELDS} columns" in message


def test_delimiters_inside_quoted_fields_are_not_fields() -> None:
    scan(b'"a,b,c,d,e,f",x\n"he said ""1,2,3,4,5"", twice",y\n')
    scan(b'x,"an unclosed quote, with, commas, in, it\n')


def test_a_quote_inside_a_field_is_a_character_as_for_pandas() -> None:
    data = b'x,a,b,c,d,e\n5",1,2,3,4,5\n'
    assert pd.read_csv(io.BytesIO(data)).shape == (1, 6)  # pandas reads six fields
    assert "line 1 has 6 fields" in refusal(data)


def test_without_a_delimiter_only_lengths_count() -> None:
    scan(b'{"a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "f": 6}\n', max_fields=None)


def test_a_file_is_checked_a_chunk_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_bytes(b"a,b\r\n" + b"1,2\r\n" * 10_000)
    assert check_lines(path, MAX_CHARS, MAX_FIELDS) == 2 * 10_001  # \r\n counts twice
    path.write_bytes(b"a\n" + b"1," * 1_000_000)
    with pytest.raises(TooLarge, match="line 2"):
        check_lines(path, MAX_CHARS, MAX_FIELDS)


@pytest.mark.parametrize("where", [0, 1000, (1 << 20) - 5_000, 3 << 20])
def test_one_long_line_among_short_ones_is_found_wherever_it_is(where: int) -> None:
    # Limits large enough that short lines are passed over without being measured.
    short = b"1,2,3\n" * ((4 << 20) // 6)
    line = b"x" * 20_001 + b"\n"
    data = short[:where] + (b"\n" if where else b"") + line + short[where:]
    assert "20000 characters" in refusal(data, 1 << 20, max_fields=10_000, max_chars=20_000)
    scan(short, 1 << 20, max_fields=10_000, max_chars=20_000)


def _expected_refusal(data: bytes) -> bool:
    """What the limits say of ``data``, line by line, with Python's csv module for fields."""
    for line in re.split(rb"\r\n|\r|\n", data):
        text = line.decode()
        fields = next(csv.reader([text]), [])
        if len(text) > MAX_CHARS or len(fields) > MAX_FIELDS:
            return True
    return False


@given(
    lines=st.lists(st.text(alphabet='ab,"é', max_size=3 * MAX_CHARS // 2), max_size=6),
    end=st.sampled_from(["\n", "\r\n", "\r"]),
    chunk=st.integers(min_value=1, max_value=64),
)
def test_the_verdict_is_the_limits_and_not_the_chunking(
    lines: list[str], end: str, chunk: int
) -> None:
    data = end.join(lines).encode()
    try:
        scan(data, chunk)
    except TooLarge:
        refused = True
    else:
        refused = False
    assert refused == _expected_refusal(data)
