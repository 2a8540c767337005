"""Requests through faults, on a real ``jobsvc serve``: PostgreSQL restarted under a burst of
requests (every answer 202/200 or 503 with Retry-After, never 500, and every 202'd job
stored), and clients that stall or go away (headers sent too slowly, a body that stops, a
client that disconnects mid-upload: cut off in bounded time, one log line, nothing stored).

The PostgreSQL test restarts the local cluster (skipped when there is none, unless
JOBSVC_TEST_REQUIRE_POSTGRES is set, as in ``conftest``).
"""

from __future__ import annotations

import asyncio
import select
import shutil
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.conftest import pg_ctl
from tests.live_jobs import submit, wait_terminal, wait_until
from tests.live_server import LiveServer

pytestmark = pytest.mark.slow

IDLE_SECONDS = 1.0
SLACK_SECONDS = 2.0  # a loaded machine's share of a deadline's measurement


@pytest.fixture
def sqlite_file(tmp_path: Path, sqlite_template: Path) -> Path:
    path = tmp_path / "jobsvc.db"
    shutil.copyfile(sqlite_template, path)
    return path


# --- PostgreSQL restarted -----------------------------------------------------------------------

SUBMITTERS = 6


def test_requests_during_a_postgresql_restart_answer_503_never_500(
    pg_database_url: str, cluster: list[str], tmp_path: Path
) -> None:
    server = LiveServer(pg_database_url, tmp_path / "server.log")
    answers: list[tuple[str, httpx.Response]] = []
    unanswered: list[str] = []
    stop = threading.Event()

    def keep_asking(ask: Callable[[httpx.Client, int], tuple[str, httpx.Response]]) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as own:
            turn = 0
            while not stop.is_set():
                try:
                    answers.append(ask(own, turn))
                except httpx.TransportError as error:  # the server must answer every request
                    unanswered.append(repr(error))
                turn += 1

    def submitting(http: httpx.Client, _turn: int) -> tuple[str, httpx.Response]:
        return "submit", http.post("/jobs", json={"task": "double", "data": [{"a": 1}]})

    with server, httpx.Client(base_url=server.url, timeout=30) as http:
        known = submit(http, "double", {})
        wait_terminal(http, known, timeout=30)
        reads = [
            ("get", lambda h: h.get(f"/jobs/{known}")),
            ("list", lambda h: h.get("/jobs", params={"limit": 5})),
            ("events", lambda h: h.get(f"/jobs/{known}/events")),
            ("cancel", lambda h: h.post(f"/jobs/{known}/cancel")),
            ("healthz", lambda h: h.get("/healthz")),
        ]

        def reading(h: httpx.Client, turn: int) -> tuple[str, httpx.Response]:
            name, ask = reads[turn % len(reads)]
            return name, ask(h)

        def accepted() -> int:
            return sum(1 for name, r in list(answers) if name == "submit" and r.status_code == 202)

        threads = [
            threading.Thread(target=keep_asking, args=(submitting,)) for _ in range(SUBMITTERS)
        ]
        threads.append(threading.Thread(target=keep_asking, args=(reading,)))
        for thread in threads:
            thread.start()
        try:
            wait_until(lambda: accepted() >= 20, 30, "submits accepted before the restart")
            pg_ctl(cluster, "restart")
            before = accepted()
            wait_until(lambda: accepted() >= before + 20, 60, "submits accepted after it")
        finally:
            stop.set()
            for thread in threads:
                thread.join(60)
        log = server.log()

    assert not unanswered, unanswered[:10]
    statuses = {"submit": {202, 503}, "cancel": {409, 503}}
    wrong = [
        (name, r.status_code, r.text[:200])
        for name, r in answers
        if r.status_code not in statuses.get(name, {200, 503})
    ]
    assert not wrong, (wrong[:10], log[-4000:])
    refused = [r for _, r in answers if r.status_code == 503]
    assert refused, "no request met the restart: the test proved nothing"
    assert all(r.headers.get("retry-after") for r in refused)
    assert "Exception in ASGI application" not in log, log[-4000:]

    accepted_ids = [r.json()["id"] for name, r in answers if r.status_code == 202]
    stored = asyncio.run(stored_job_ids(pg_database_url, accepted_ids))
    assert set(accepted_ids) <= stored, set(accepted_ids) - stored


async def stored_job_ids(database_url: str, ids: list[str]) -> set[str]:
    conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        rows = await conn.fetch("SELECT id FROM jobs WHERE id = ANY($1::text[])", ids)
    finally:
        await conn.close()
    return {row["id"] for row in rows}


# --- clients that stall or go away --------------------------------------------------------------


def idle_server(database: Path, log: Path) -> LiveServer:
    return LiveServer(
        f"sqlite+aiosqlite:///{database}", log, JOBSVC_REQUEST_IDLE_SECONDS=str(IDLE_SECONDS)
    )


def closed_by_server(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(timeout)
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def log_lines(server: LiveServer, text: str) -> list[str]:
    return [line for line in server.log().splitlines() if text in line]


def assert_nothing_stored(database: Path) -> None:
    files = database.with_name(database.name + ".files")
    assert not files.exists() or list(files.iterdir()) == []
    with sqlite3.connect(database) as conn:
        assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (0,)
    conn.close()


def test_request_headers_sent_slower_than_the_limit_are_cut_off(
    sqlite_file: Path, tmp_path: Path
) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: jobsvc\r\nX-Slow: " + b"s" * 200 + b"\r\n\r\n"
    with idle_server(sqlite_file, tmp_path / "server.log") as server:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            opened = time.monotonic()
            closed = False
            for byte in request:  # one byte every 0.1 s: 20 s for the whole request
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    closed = True
                    break
                readable, _, _ = select.select([sock], [], [], 0.1)
                if readable:
                    assert sock.recv(65536) == b"", "the server answered slow headers"
                    closed = True
                    break
            lasted = time.monotonic() - opened
        assert closed, "the slow request was never cut off"
        assert 0.9 * IDLE_SECONDS <= lasted < IDLE_SECONDS + SLACK_SECONDS, lasted
        wait_until(lambda: log_lines(server, "did not send its request headers"), 5, "the log")
        assert httpx.get(server.url + "/healthz").status_code == 200


def test_an_upload_that_stops_midway_is_answered_408_after_the_idle_limit(
    sqlite_file: Path, tmp_path: Path
) -> None:
    head = (
        b"POST /jobs?task=summarize HTTP/1.1\r\nHost: jobsvc\r\nContent-Type: text/csv\r\n"
        b"Content-Length: 10000000\r\n\r\n"
    )
    with idle_server(sqlite_file, tmp_path / "server.log") as server:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(head + b"a,b\n" + b"1,2\n" * 10_000)
            stalled = time.monotonic()
            answer = closed_by_server(sock, timeout=IDLE_SECONDS + 30)
            waited = time.monotonic() - stalled
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert 0.9 * IDLE_SECONDS <= waited < IDLE_SECONDS + SLACK_SECONDS, waited
        lines = wait_until(lambda: log_lines(server, "sent no request body for"), 5, "the log")
        assert len(lines) == 1, lines
        assert "Traceback" not in server.log(), server.log()[-4000:]
    assert_nothing_stored(sqlite_file)


MULTIPART_START = (
    b"--cut\r\n"
    b'Content-Disposition: form-data; name="task"\r\n\r\nsummarize\r\n'
    b"--cut\r\n"
    b'Content-Disposition: form-data; name="file"; filename="a.csv"\r\n'
    b"Content-Type: text/csv\r\n\r\n"
)


@pytest.mark.parametrize(
    ("content_type", "body_start"),
    [
        (b"text/csv", b"a,b\n" + b"1,2\n" * 10_000),
        (b"multipart/form-data; boundary=cut", MULTIPART_START + b"a,b\n" + b"1,2\n" * 10_000),
    ],
    ids=["csv", "multipart"],
)
def test_a_client_that_disconnects_mid_upload_is_one_log_line_not_a_traceback(
    sqlite_file: Path, tmp_path: Path, content_type: bytes, body_start: bytes
) -> None:
    head = (
        b"POST /jobs?task=summarize HTTP/1.1\r\nHost: jobsvc\r\nContent-Type: "
        + content_type
        + b"\r\nContent-Length: 10000000\r\n\r\n"
    )
    with idle_server(sqlite_file, tmp_path / "server.log") as server:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(head + body_start)
        lines = wait_until(lambda: log_lines(server, "went away"), 10, "the disconnect's line")
        assert len(lines) == 1, lines
        log = server.log()
        assert "Traceback" not in log, log[-4000:]
        assert "Exception in ASGI application" not in log, log[-4000:]
        assert httpx.get(server.url + "/healthz").status_code == 200
    assert_nothing_stored(sqlite_file)
