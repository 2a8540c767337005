"""A text upload's lines checked against the limits while its bytes stream into the parser.

pandas holds a whole line before it can say anything about it, and spends on each of its fields:
a CSV of a header and 100 MB of ``1,`` on one line grew two processes to 23 GB each, and a
line of a million fields took 79 s and 2 GB to parse. So a CSV or NDJSON upload reaches the
parser through ``CheckedReader``: each line is measured as its bytes pass (its characters and,
for a CSV, its fields), and the first line over a limit stops the parse with ``TooLarge``,
having held no more than that line. The pass costs a few vectorised comparisons a chunk.

A line here is what lies between line ends (``\\n`` or ``\\r``); a quoted cell that spans
lines is measured whole by the parser's own check afterwards.
"""

from __future__ import annotations

import io
import re
from typing import Any

import numpy as np

from jobsvc.errors import TooLarge

# UTF-8 continuation bytes: a text's characters are its bytes less these.
_CONTINUATION = bytes(range(0x80, 0xC0))
# A quoted CSV field where a field starts (a quote elsewhere is a literal, as in pandas'
# tokenizer), ``""`` inside it an escaped quote; unclosed, it runs to the end of the line.
_QUOTED_FIELD = r'(?:^|(?<={d}))"[^"]*(?:""[^"]*)*(?:"|\Z)'


def characters(data: bytes) -> int:
    """The characters of UTF-8 ``data`` (what the limits count), without decoding it."""
    return len(data.translate(None, _CONTINUATION))


class LineScanner:
    """Measures each line fed to it; ``TooLarge`` names the first line over a limit.

    ``max_fields`` (a CSV's columns) is checked when a ``delimiter`` is given.
    """

    def __init__(self, max_chars: int, max_fields: int | None = None, delimiter: bytes = b","):
        self.max_chars = max_chars
        self.max_fields = max_fields
        self.delimiter = delimiter
        self._quoted = re.compile(_QUOTED_FIELD.format(d=re.escape(delimiter.decode())).encode())
        # A line shorter than this can break neither limit (n fields take n - 1 delimiters).
        self._worth_a_look = min(max_chars + 1, max_fields or max_chars + 1)
        self._open = bytearray()  # the line not yet ended: never longer than the limits allow
        self._open_delimiters = 0
        self._lines_before = 0  # for the message: the number of the line that broke a limit

    def feed(self, chunk: bytes) -> None:
        first_end = _first_line_end(chunk)
        if first_end < 0:
            self._extend_open_line(chunk)
            return
        self._extend_open_line(chunk[:first_end])  # the open line ends here, checked
        self._lines_before += chunk[first_end] == 0x0A
        self._open.clear()
        self._open_delimiters = 0
        last_end = max(chunk.rfind(b"\n"), chunk.rfind(b"\r"))
        if last_end > first_end:
            self._check_ended_lines(chunk, first_end + 1, last_end + 1)
        self._extend_open_line(chunk[last_end + 1 :])

    def _extend_open_line(self, piece: bytes) -> None:
        self._open += piece
        if self.max_fields is not None:
            self._open_delimiters += piece.count(self.delimiter)
        # Checked as it grows, so a line that never ends is refused as soon as it is too long.
        too_many = self.max_fields is not None and self._open_delimiters >= self.max_fields
        if len(self._open) > self.max_chars or too_many:
            self._check_line(bytes(self._open), self._lines_before + 1)

    def _check_ended_lines(self, chunk: bytes, start: int, stop: int) -> None:
        """Check the lines in ``chunk[start:stop]``, which ends with a line end (no copy of
        the chunk is made: a few vectorised passes find the lines worth a closer look)."""
        codes = np.frombuffer(chunk, dtype=np.uint8, count=stop - start, offset=start)
        ends = newlines = np.flatnonzero(codes == 0x0A)
        if chunk[stop - 1] == 0x0D:  # else the last line ends in the next chunk's \n
            ends = np.append(newlines, stop - start - 1)
        starts = np.concatenate(([0], ends[:-1] + 1))
        # A long stretch may hold several lines ended by \r alone (old Mac files).
        for index in np.flatnonzero(ends - starts >= self._worth_a_look):
            begin, end = start + int(starts[index]), start + int(ends[index])
            number = self._lines_before + chunk.count(b"\n", start, begin) + 1
            for line in chunk[begin:end].split(b"\r"):
                self._check_line(line, number)
        self._lines_before += len(newlines)

    def _check_line(self, line: bytes, number: int) -> None:
        if len(line) > self.max_chars:
            length = characters(line)
            if length > self.max_chars:
                raise TooLarge(
                    f"line {number} is longer than {self.max_chars} characters ({length} or "
                    f"more); the limit on a line or a cell is {self.max_chars} characters"
                )
        if self.max_fields is not None and line.count(self.delimiter) >= self.max_fields:
            # Rare enough to look closer: delimiters inside quoted fields do not count.
            fields = self._quoted.sub(b"", line).count(self.delimiter) + 1
            if fields > self.max_fields:
                raise TooLarge(
                    f"line {number} has {fields} fields; the limit is {self.max_fields} columns"
                )


def _first_line_end(chunk: bytes) -> int:
    ends = [at for at in (chunk.find(b"\n"), chunk.find(b"\r")) if at >= 0]
    return min(ends, default=-1)


class CheckedReader(io.RawIOBase):
    """A binary file whose bytes pass through a ``LineScanner`` on their way to the reader."""

    def __init__(self, raw: io.BufferedIOBase, scanner: LineScanner) -> None:
        super().__init__()
        self._raw = raw
        self._scanner = scanner

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        read = self._raw.readinto(buffer)
        if read:
            self._scanner.feed(bytes(memoryview(buffer)[:read]))
        return read


def checked(
    raw: io.BufferedIOBase, scanner: LineScanner, chunk_bytes: int = 1 << 20
) -> io.BufferedReader:
    """``raw`` for a parser, read in chunks of ``chunk_bytes`` that ``scanner`` checks first."""
    return io.BufferedReader(CheckedReader(raw, scanner), chunk_bytes)
