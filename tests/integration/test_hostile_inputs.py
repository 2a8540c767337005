"""Inputs shaped to exhaust memory are refused before pandas parses them, quickly, with a 4xx
that names the limit, nothing stored, and the service's processes staying small.

Measured on the code before these checks, with 100 MB inputs and the parse under a 4 GB
address-space cap: a CSV line of 50 M fields grew its converter process to 3.8 GB in 17 s
and ended in a MemoryError (a 500; uncapped, two processes reached 23 GB each); a 100 MB
header cell was a 500 at once; a 100 MB cell took 620 MB, an NDJSON line of 100 MB 920 MB,
60 M one-byte rows 1.2 GB, a 200,000-column Parquet footer 660 MB; a Parquet footer that
claims 1 TB of data it does not hold was accepted.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from asgi_lifespan import LifespanManager

from jobsvc.app import create_app
from tests.conftest import make_settings

MB = 1 << 20
BODY_MB = 50  # large enough that parsing it whole would have cost gigabytes (above)
MAX_ROWS = 1_000_000
CSV = "text/csv"
NDJSON = "application/x-ndjson"
PARQUET = "application/vnd.apache.parquet"
# What one refused request may add to the service's processes, summed (the line held by the
# check, a Parquet footer of 20,000 columns, the API's buffers); and what the service's child
# processes (fork server, converter, worker) may hold at their peak, summed.
GROWTH_LIMIT_MB = 256
CHILDREN_PEAK_LIMIT_MB = 1024
ANSWER_SECONDS = 10.0

# --- the inputs ----------------------------------------------------------------------------


def write_repeated(path: Path, head: bytes, unit: bytes, megabytes: int, tail: bytes) -> None:
    block = unit * (MB // len(unit))
    with path.open("wb") as out:
        out.write(head)
        for _ in range(megabytes):
            out.write(block)
        out.write(tail)


# Each: (content type, how to make it, what the refusal names). Large ones are written in
# chunks by ``make_input``: never whole in the test's memory.
LARGE: dict[str, tuple[str, tuple[bytes, bytes, int, bytes], tuple[str, ...]]] = {
    "a line of 25 M fields": (CSV, (b"x\n", b"1,", BODY_MB, b""), ("line 2", "characters")),
    "a 50 MB cell": (CSV, (b"x\n", b"a", BODY_MB, b"\n"), ("line 2", "characters")),
    "a 50 MB header": (CSV, (b"", b"a", BODY_MB, b"\n1\n"), ("line 1", "characters")),
    "a quote never closed": (CSV, (b'x\n"', b"a", BODY_MB, b""), ("line 2", "characters")),
    "NDJSON of one 50 MB line": (NDJSON, (b'{"a":"', b"x", BODY_MB, b'"}\n'), ("line 1",)),
    "20 M one-byte rows": (CSV, (b"x\n", b"1\n", 40, b""), (f"more than {MAX_ROWS} rows",)),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile")


def make_input(inputs: Path, name: str) -> Path:
    path = inputs / (name.replace(" ", "_") + ".data")
    if not path.exists():
        write_repeated(path, *LARGE[name][1])
    return path


async def chunks(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as source:
        while chunk := source.read(MB):
            yield chunk


# A Parquet footer written by hand (Thrift's compact protocol), so that it can say what the
# data does not hold.
_I32, _I64, _BINARY, _LIST, _STRUCT = 5, 6, 8, 9, 12


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _int(value: int) -> bytes:
    return _varint((value << 1) ^ (value >> 63))  # zigzag


def _text(value: bytes) -> bytes:
    return _varint(len(value)) + value


def _struct(*fields: tuple[int, int, bytes]) -> bytes:
    out, last = bytearray(), 0
    for number, kind, payload in fields:
        out += bytes([((number - last) << 4) | kind]) + payload
        last = number
    return bytes(out + b"\x00")


def _list(kind: int, items: list[bytes]) -> bytes:
    size = len(items)
    head = bytes([size << 4 | kind]) if size < 15 else bytes([0xF0 | kind]) + _varint(size)
    return head + b"".join(items)


def lying_parquet(rows: int, data_bytes: int, columns: int = 1) -> bytes:
    """A Parquet file of ``columns`` int64 columns whose footer claims ``rows`` rows in
    column chunks of ``data_bytes`` each, and which holds no data at all."""
    names = [b"c%d" % i for i in range(columns)]
    schema = [_struct((4, _BINARY, _text(b"schema")), (5, _I32, _int(columns)))]
    leaf = [(1, _I32, _int(2)), (3, _I32, _int(0))]  # int64, required
    schema += [_struct(*leaf, (4, _BINARY, _text(name))) for name in names]
    chunks = [
        _struct(
            (2, _I64, _int(4)),
            (
                3,
                _STRUCT,
                _struct(
                    (1, _I32, _int(2)),
                    (2, _LIST, _list(_I32, [_int(0)])),
                    (3, _LIST, _list(_BINARY, [_text(name)])),
                    (4, _I32, _int(0)),
                    (5, _I64, _int(rows)),
                    (6, _I64, _int(data_bytes)),
                    (7, _I64, _int(data_bytes)),
                    (9, _I64, _int(4)),
                ),
            ),
        )
        for name in names
    ]
    group = _struct(
        (1, _LIST, _list(_STRUCT, chunks)),
        (2, _I64, _int(data_bytes * columns)),
        (3, _I64, _int(rows)),
    )
    footer = _struct(
        (1, _I32, _int(1)),
        (2, _LIST, _list(_STRUCT, schema)),
        (3, _I64, _int(rows)),
        (4, _LIST, _list(_STRUCT, [group])),
    )
    return b"PAR1" + bytes(16) + footer + struct.pack("<I", len(footer)) + b"PAR1"


def real_parquet(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buffer)
    return buffer.getvalue()


# --- the service's processes ---------------------------------------------------------------


def _descendants(pid: int) -> Iterator[int]:
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            yield int(child)
            yield from _descendants(int(child))


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except FileNotFoundError:  # ended meanwhile
        pass
    return 0


class Footprint:
    """The service's processes (this one runs the API; the fork server, the converter and
    worker processes are its descendants): their resident memory now, and what their peaks
    grew to since (each peak reset by writing 5 to clear_refs). A process that ended
    meanwhile (a converter replaced after running out of memory) is not counted: its cap
    bounded it."""

    def __init__(self) -> None:
        self.before = {pid: _status_kb(pid, "VmRSS") for pid in self._pids()}
        for pid in self.before:
            with contextlib.suppress(OSError):  # ended meanwhile
                Path(f"/proc/{pid}/clear_refs").write_text("5")

    @staticmethod
    def _pids() -> list[int]:
        return [os.getpid(), *_descendants(os.getpid())]

    def grown_mb(self) -> int:
        """The sum over the processes of their peak since then, less what they held then."""
        grown = sum(_status_kb(pid, "VmHWM") - self.before.get(pid, 0) for pid in self._pids())
        return max(0, grown) // 1024

    def peak_mb(self) -> int:
        return sum(_status_kb(pid, "VmHWM") for pid in self._pids()) // 1024

    def children_peak_mb(self) -> int:
        return sum(_status_kb(pid, "VmHWM") for pid in _descendants(os.getpid())) // 1024


@asynccontextmanager
async def service(database_url: str, **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(
        make_settings(database_url, max_rows=MAX_ROWS, **overrides), migrate_on_start=False
    )
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=60):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://jobsvc") as client:
            # One small upload first: the converter process exists before anything is measured.
            warm = await post_file(client, b"a\n1\n", CSV)()
            assert warm.status_code == 202, warm.text
            yield client


@pytest.fixture
async def client(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with service(database_url) as http:
        yield http


async def refused(
    client: httpx.AsyncClient,
    send: Callable[[], Any],
    statuses: tuple[int, ...],
    *words: str,
) -> dict[str, Any]:
    """Send a request; check that it was refused quickly, naming ``words``, with nothing
    stored (only the warm-up job) and the processes' memory bounded; its figures."""
    footprint = Footprint()
    started = time.monotonic()
    response = await send()
    seconds = time.monotonic() - started
    grown = footprint.grown_mb()
    figures = {
        "seconds": round(seconds, 2),
        "grown_mb": grown,
        "peak_mb": footprint.peak_mb(),
        "children_peak_mb": footprint.children_peak_mb(),
    }
    print(f"{response.status_code} {figures} {response.json()['detail']!r:.160}")
    assert response.status_code in statuses, response.text
    detail = response.json()["detail"]
    for word in words:
        assert word in detail
    assert seconds < ANSWER_SECONDS, figures
    assert grown < GROWTH_LIMIT_MB, figures
    assert figures["children_peak_mb"] < CHILDREN_PEAK_LIMIT_MB, figures
    jobs = (await client.get("/jobs")).json()["items"]
    assert [job["task"] for job in jobs] == ["summarize"]  # the warm-up job alone
    return figures


def post_file(client: httpx.AsyncClient, content: Any, content_type: str) -> Callable[[], Any]:
    return lambda: client.post(
        "/jobs",
        params={"task": "summarize"},
        content=content,
        headers={"content-type": content_type},
    )


# --- the tests ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LARGE))
async def test_a_large_hostile_upload_is_refused_before_it_is_parsed(
    client: httpx.AsyncClient, inputs: Path, name: str
) -> None:
    content_type, _, words = LARGE[name]
    path = make_input(inputs, name)
    await refused(client, post_file(client, chunks(path), content_type), (413,), *words)


async def test_a_quote_open_across_50_mb_of_lines_is_refused(
    client: httpx.AsyncClient, inputs: Path
) -> None:
    path = inputs / "quote_over_lines.csv"
    write_repeated(path, b'x\n"', b"a" * 99 + b"\n", BODY_MB, b"")
    # Each line is short: pandas reads the one cell to the end and finds its quote unclosed.
    await refused(client, post_file(client, chunks(path), CSV), (422,), "EOF inside string")


async def test_a_header_of_200_000_columns_is_refused(client: httpx.AsyncClient) -> None:
    body = b"a," * 199_999 + b"a\n" + b"1," * 199_999 + b"1\n"
    await refused(client, post_file(client, body, CSV), (413,), "line 1", "10000 columns")


async def test_a_multipart_upload_is_checked_the_same(
    client: httpx.AsyncClient, inputs: Path
) -> None:
    path = make_input(inputs, "a line of 25 M fields")

    async def send() -> httpx.Response:
        with path.open("rb") as upload:
            return await client.post(
                "/jobs", data={"task": "summarize"}, files={"file": ("x.csv", upload, CSV)}
            )

    await refused(client, send, (413,), "line 2", "characters")


@pytest.mark.parametrize("depth", [30_000, 100_000])  # parsed in the API process; in a converter
async def test_json_nested_too_deep_is_refused(client: httpx.AsyncClient, depth: int) -> None:
    body = b'{"task": "summarize", "data": ' + b"[" * depth

    def send() -> Any:
        return client.post("/jobs", content=body, headers={"content-type": "application/json"})

    await refused(client, send, (413,), "200 levels")


async def test_params_nested_too_deep_are_refused(client: httpx.AsyncClient) -> None:
    def in_a_form() -> Any:
        files = {"file": ("x.csv", b"a\n1\n", CSV)}
        return client.post(
            "/jobs", data={"task": "summarize", "params": "[" * 100_000}, files=files
        )

    def in_the_query() -> Any:
        return client.post(
            "/jobs",
            params={"task": "summarize", "params": "[" * 8_000},
            content=b"a\n1\n",
            headers={"content-type": CSV},
        )

    await refused(client, in_a_form, (413,), "params", "200 levels")
    await refused(client, in_the_query, (413,), "params", "200 levels")


async def test_ndjson_nested_too_deep_is_refused(client: httpx.AsyncClient) -> None:
    body = b"[" * 500_000 + b"\n"
    await refused(client, post_file(client, body, NDJSON), (422,), "depth limit")


def _bogus_footer_length() -> bytes:
    good = real_parquet(pd.DataFrame({"a": range(1000)}))
    return good[:-8] + struct.pack("<I", 2**32 - 16) + b"PAR1"


# Made when the test runs, not when it is collected.
PARQUETS: dict[str, tuple[Callable[[], bytes], int, tuple[str, ...]]] = {
    "claims 10^12 rows": (lambda: lying_parquet(10**12, 1 << 40), 413, ("rows",)),
    "claims 1 TB chunks": (lambda: lying_parquet(1000, 1 << 40), 422, ("Parquet",)),
    "200,000 columns": (lambda: lying_parquet(1, 8, 200_000), 413, ("footer", "10000 columns")),
    "20,000 columns": (
        lambda: real_parquet(pd.DataFrame({f"c{i}": [1] for i in range(20_000)})),
        413,
        ("20000 columns",),
    ),
    "truncated": (
        lambda: real_parquet(pd.DataFrame({"a": range(1000)}))[:3000],
        422,
        ("Parquet",),
    ),
    "footer length bogus": (_bogus_footer_length, 422, ("footer",)),
    "a 2 MB cell": (
        lambda: real_parquet(pd.DataFrame({"a": ["x" * 2_000_000]})),
        413,
        ("column 'a'",),
    ),
}


@pytest.mark.parametrize("name", list(PARQUETS))
async def test_a_hostile_parquet_file_is_refused(client: httpx.AsyncClient, name: str) -> None:
    make, status, words = PARQUETS[name]
    await refused(client, post_file(client, make(), PARQUET), (status,), *words)


def sparse_ndjson() -> bytes:
    # 230 kB whose 20,000 rows each have a key of their own: pandas makes a dense table of
    # 20,000 x 20,000 cells (3.2 GB), which no limit on the input's shape prevents.
    return b"".join(b'{"k%d": 1}\n' % i for i in range(20_000))


def empty_records() -> bytes:
    # 15 MB of JSON: 5 M empty records, 400 MB as Python objects. pydantic's Rust code panics
    # when an allocation fails, and aborts its process (it hung there while it resolved a
    # backtrace, with RUST_BACKTRACE=1 as here).
    return b'{"task": "summarize", "data": [' + b"{}," * 5_000_000 + b"{}]}"


SHAPES = {
    "NDJSON of a key a row": (sparse_ndjson, NDJSON),
    "JSON of 5 M empty records": (empty_records, "application/json"),
}


@pytest.mark.parametrize("shape", list(SHAPES))
async def test_a_shape_no_limit_foresaw_fails_its_request_not_the_machine(
    database_url: str, shape: str
) -> None:
    make, content_type = SHAPES[shape]
    async with service(database_url, converter_memory_mb=256) as client:
        await refused(
            client,
            post_file(client, make(), content_type),
            (413,),
            "JOBSVC_CONVERTER_MEMORY_MB=256",
        )
        # The converter process was replaced, and the next upload is converted as ever.
        after = await post_file(client, b"a\n1\n", CSV)()
        assert after.status_code == 202, after.text
