"""A text upload's lines checked against the limits, a chunk at a time, before pandas sees it.

pandas holds a whole line before it can say anything about it, and spends on each of its fields:
a CSV of a header and 100 MB of ``1,`` on one line grew two processes to 23 GB each, and a
line of a million fields took 79 s and 2 GB to parse. So a CSV or NDJSON upload is read once
in chunks first (``check_lines``): each line is measured as its bytes pass (its characters
and, for a CSV, its fields), and the first line over a limit is refused with ``TooLarge``,
having held no more than that line. The pass costs 0.3 ms a megabyte where lines are short
(a few ``bytes.find`` a chunk show that no line can be long: 8 ms for 30 MB of CSV, whose
parse takes 50 ms), 0.7 ms where it must measure each line.

A line here is what lies between line ends (``\\n`` or ``\\r``); a quoted cell that spans
lines is measured whole by the parser's own check afterwards.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from jobsvc.errors import TooLarge

CHUNK_BYTES = 1 << 20
# UTF-8 continuation bytes: a text's characters are its bytes less these.
_CONTINUATION = bytes(range(0x80, 0xC0))
# A quoted CSV field where a field starts (a quote elsewhere is a literal, as in pandas'
# tokenizer), ``""`` inside it an escaped quote; unclosed, it runs to the end of the line.
_QUOTED_FIELD = r'(?:^|(?<={d}))"[^"]*(?:""[^"]*)*(?:"|\Z)'
# Below this, finding one line end per stretch costs more than measuring every line.
_FEWEST_BYTES_TO_SKIP = 1024


def characters(data: bytes) -> int:
    """The characters of UTF-8 ``data`` (what the limits count), without decoding it."""
    return len(data.translate(None, _CONTINUATION))


def check_lines(path: Path, max_chars: int, max_fields: int | None = None) -> int:
    """Check every line of the file at ``path`` (see ``LineScanner``); its number of line ends,
    which no number of rows in it exceeds by more than one."""
    scanner = LineScanner(max_chars, max_fields)
    with path.open("rb") as source:
        while chunk := source.read(CHUNK_BYTES):
            scanner.feed(chunk)
    return scanner.line_ends


class LineScanner:
    """Measures each line fed to it; ``TooLarge`` names the first line over a limit.

    ``max_fields`` (a CSV's columns) is checked when given, fields split by ``delimiter``.
    """

    def __init__(self, max_chars: int, max_fields: int | None = None, delimiter: bytes = b","):
        self.max_chars = max_chars
        self.max_fields = max_fields
        self.delimiter = delimiter
        self.line_ends = 0  # \n and \r alike: \r\n counts twice
        self._quoted = re.compile(_QUOTED_FIELD.format(d=re.escape(delimiter.decode())).encode())
        # A line shorter than this can break neither limit (n fields take n - 1 delimiters).
        self._worth_a_look = min(max_chars + 1, max_fields or max_chars + 1)
        self._open = bytearray()  # the line not yet ended: never longer than the limits allow
        self._open_delimiters = 0
        self._newlines = 0  # for the message: the number of the line that broke a limit

    def feed(self, chunk: bytes) -> None:
        ends = [at for at in (chunk.find(b"\n"), chunk.find(b"\r")) if at >= 0]
        first_end = min(ends, default=-1)
        if first_end < 0:
            self._extend_open_line(chunk)
            return
        self._extend_open_line(chunk[:first_end])  # the open line ends here, checked
        self._newlines += chunk[first_end] == 0x0A
        self.line_ends += 1
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
            self._check_line(bytes(self._open), self._newlines + 1)

    def _check_ended_lines(self, chunk: bytes, start: int, stop: int) -> None:
        """Check the lines in ``chunk[start:stop]``, which ends with a line end."""
        codes = np.frombuffer(chunk, dtype=np.uint8, count=stop - start, offset=start)
        is_newline = codes == 0x0A
        newlines = int(np.count_nonzero(is_newline))
        self.line_ends += newlines
        if chunk.find(b"\r", start, stop) >= 0:  # a second pass only where there is a \r
            self.line_ends += int(np.count_nonzero(codes == 0x0D))
        if not self._all_short(chunk, start, stop):
            ends = np.flatnonzero(is_newline)
            if chunk[stop - 1] == 0x0D:  # else the last line ends in the next chunk's \n
                ends = np.append(ends, stop - start - 1)
            starts = np.concatenate(([0], ends[:-1] + 1))
            # A long stretch may hold several lines ended by \r alone (old Mac files).
            for index in np.flatnonzero(ends - starts >= self._worth_a_look):
                begin, end = start + int(starts[index]), start + int(ends[index])
                number = self._newlines + chunk.count(b"\n", start, begin) + 1
                for line in chunk[begin:end].split(b"\r"):
                    self._check_line(line, number)
        self._newlines += newlines

    def _all_short(self, chunk: bytes, start: int, stop: int) -> bool:
        """True when each stretch of half the length worth a look holds a \\n: then no line is
        that long, and finding those \\n reads a few bytes a stretch."""
        step = self._worth_a_look // 2
        if step < _FEWEST_BYTES_TO_SKIP:
            return False
        return all(chunk.find(b"\n", at, at + step) >= 0 for at in range(start, stop - step, step))

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
