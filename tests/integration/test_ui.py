"""The dashboard: its pages over HTTP on both backends, and a real browser against a real server.

The browser test needs Chromium at /usr/bin/chromium (Debian's ``chromium`` package) and the
``playwright`` Python package; it is skipped without them unless JOBSVC_TEST_REQUIRE_BROWSER is
set (CI), where it fails. JOBSVC_UI_SCREENSHOT=PATH saves a picture of the dashboard there.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from jobsvc.app import create_app
from jobsvc.settings import Settings
from tests.conftest import make_settings, submit, wait_for_status

REPO_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
REQUIRE_BROWSER = bool(os.environ.get("JOBSVC_TEST_REQUIRE_BROWSER"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
XSS = "<script>alert('x')</script>"


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    """The service with the dashboard at /ui (``client`` from conftest talks to this one)."""
    application = create_app(settings, migrate_on_start=False)
    async with LifespanManager(application, startup_timeout=60, shutdown_timeout=60):
        yield application


def later() -> str:
    """A run_at far enough ahead that the job stays queued for the whole test."""
    return (datetime.now(UTC) + timedelta(hours=1)).isoformat()


def count_of(html: str, state: str) -> int:
    found = re.search(rf'data-testid="count-{state}">(\d+)<', html)
    assert found, f"no count for {state}"
    return int(found.group(1))


def listed_ids(html: str) -> list[str]:
    return re.findall(r'<tr data-job-id="([^"]+)"', html)


async def failed_boom(client: httpx.AsyncClient, message: str = "bad input") -> dict[str, Any]:
    job = await submit(client, "boom", params={"message": message}, max_attempts=1)
    return await wait_for_status(client, job["id"], "failed")


# --- pages over HTTP ---------------------------------------------------------------------------


async def test_index_shows_counts_and_jobs(client: httpx.AsyncClient) -> None:
    done = [await submit(client, "double", data=[{"a": 1}]) for _ in range(2)]
    for job in done:
        await wait_for_status(client, job["id"], "succeeded")
    failed = await failed_boom(client)
    waiting = await submit(client, "double", data=[{"a": 1}], run_at=later())

    response = await client.get("/ui")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    assert [count_of(html, s) for s in ("queued", "running", "retrying")] == [1, 0, 0]
    assert [count_of(html, s) for s in ("succeeded", "failed", "cancelled")] == [2, 1, 0]
    # Newest first, each linked to its page.
    assert listed_ids(html) == [waiting["id"], failed["id"], done[1]["id"], done[0]["id"]]
    assert f'href="/ui/jobs/{failed["id"]}"' in html
    assert '<span class="errtype" title="bad input">ValueError</span>' in html
    assert "1/1" in html  # the failed job's attempts of max
    # A job is queued: the page refreshes itself quickly, with or without scripts.
    assert 'data-live-every="2000"' in html
    assert '<meta http-equiv="refresh" content="2; url=/ui">' in html


async def test_index_refreshes_slowly_when_nothing_is_active(client: httpx.AsyncClient) -> None:
    job = await submit(client, "double", data=[{"a": 1}])
    await wait_for_status(client, job["id"], "succeeded")

    html = (await client.get("/ui")).text

    # Still looks for new jobs, but less often, and never reloads a page without scripts.
    assert 'data-live-every="5000"' in html
    assert 'http-equiv="refresh"' not in html


async def test_index_filters_by_state_and_task(client: httpx.AsyncClient) -> None:
    doubled = await submit(client, "double", data=[{"a": 1}])
    await wait_for_status(client, doubled["id"], "succeeded")
    failed = await failed_boom(client)
    waiting = await submit(client, "nothing", data=[{"a": 1}], run_at=later())

    by_state = (await client.get("/ui", params={"status": "failed"})).text
    by_task = (await client.get("/ui", params={"task": "double"})).text
    both = (await client.get("/ui", params={"status": "queued", "task": "double"})).text
    everything = (await client.get("/ui", params={"status": "", "task": ""})).text
    unknown = await client.get("/ui", params={"status": "exploded"})

    assert listed_ids(by_state) == [failed["id"]]
    assert '<option value="failed" selected>' in by_state
    assert listed_ids(by_task) == [doubled["id"]]
    assert listed_ids(both) == []
    assert "No jobs match these filters." in both
    assert listed_ids(everything) == [waiting["id"], failed["id"], doubled["id"]]
    # A hand-typed bad state is explained, not a JSON error page.
    assert unknown.status_code == 200
    assert "There is no state &#39;exploded&#39;" in unknown.text
    assert len(listed_ids(unknown.text)) == 3
    # The counts stay the whole picture while the list is filtered.
    assert count_of(by_state, "succeeded") == 1


async def test_index_pages_with_an_older_link(client: httpx.AsyncClient) -> None:
    jobs = [await submit(client, "double", data=[{"a": i}], run_at=later()) for i in range(5)]
    newest_first = [job["id"] for job in reversed(jobs)]

    seen: list[str] = []
    url: str | None = "/ui?task=double&limit=2"
    pages = 0
    while url is not None:
        html = (await client.get(url)).text
        seen += listed_ids(html)
        pages += 1
        older = re.search(r'<a href="([^"]+)" rel="next">Older', html)
        url = older.group(1).replace("&amp;", "&") if older else None
        if url is not None:
            assert "task=double" in url
            assert "limit=2" in url

    assert seen == newest_first
    assert pages == 3


async def test_job_page_shows_params_progress_error_and_traceback(
    client: httpx.AsyncClient,
) -> None:
    job = await failed_boom(client, "column 'v' is missing")

    response = await client.get(f"/ui/jobs/{job['id']}")

    assert response.status_code == 200
    html = response.text
    assert '<span class="badge failed" id="job-status" data-testid="status">failed</span>' in html
    assert "&#34;message&#34;: &#34;column &#39;v&#39; is missing&#34;" in html  # pretty JSON
    assert "ValueError" in html
    assert "column &#39;v&#39; is missing" in html
    assert "<summary>Traceback</summary>" in html
    assert "raise ValueError(message)" in html
    assert 'role="progressbar"' in html
    # Every event is listed: queued, running, failed.
    events = re.findall(r'<td><span class="badge (\w+)">', html)
    assert events == ["queued", "running", "failed"]
    # Retry is offered, Cancel is not; a finished job's page does not refresh.
    assert re.search(r'class="primary"\s*>Retry', html)
    assert re.search(r'class="danger"\s*disabled', html)
    assert "data-live-url=" not in html


async def test_job_page_links_the_result(client: httpx.AsyncClient) -> None:
    job = await submit(client, "double", data=[{"a": 2}])
    await wait_for_status(client, job["id"], "succeeded")

    html = (await client.get(f"/ui/jobs/{job['id']}")).text

    link = re.search(r'<a href="([^"]+)" id="result-link">', html)
    assert link is not None
    assert link.group(1) == f"/jobs/{job['id']}/result"
    assert (await client.get(link.group(1))).json() == [{"a": 4}]
    assert 'aria-valuenow="100"' in html


async def test_running_job_page_refreshes_itself(client: httpx.AsyncClient, tmp_path: Path) -> None:
    release = tmp_path / "release"
    job = await submit(client, "wait_for_file", data=[{"a": 1}], params={"path": str(release)})
    await wait_for_status(client, job["id"], "running")
    deadline = time.monotonic() + 30
    # Progress arrives from the worker a moment after the status changes.
    while (await client.get(f"/jobs/{job['id']}")).json()["progress"] != 0.5:
        assert time.monotonic() < deadline, "the task never reported its progress"
        await asyncio.sleep(0.02)

    html = (await client.get(f"/ui/jobs/{job['id']}")).text
    release.touch()

    assert f'data-live-url="/ui/jobs/{job["id"]}"' in html
    assert 'aria-valuenow="50.0"' in html  # the task reports half-way while it waits
    await wait_for_status(client, job["id"], "succeeded")


async def test_retry_form_requeues_and_redirects(client: httpx.AsyncClient) -> None:
    job = await failed_boom(client)

    response = await client.post(f"/ui/jobs/{job['id']}/retry")

    assert response.status_code == 303
    assert response.headers["location"] == f"/ui/jobs/{job['id']}"
    # boom fails again; the retry shows in the history between the two failures.
    await wait_for_status(client, job["id"], "failed")
    events = (await client.get(f"/jobs/{job['id']}/events")).json()
    statuses = [event["status"] for event in events]
    assert statuses == ["queued", "running", "failed", "queued", "running", "failed"]


async def test_cancel_form_cancels_and_redirects(client: httpx.AsyncClient) -> None:
    job = await submit(client, "double", data=[{"a": 1}], run_at=later())

    response = await client.post(f"/ui/jobs/{job['id']}/cancel")

    assert response.status_code == 303
    assert response.headers["location"] == f"/ui/jobs/{job['id']}"
    assert (await client.get(f"/jobs/{job['id']}")).json()["status"] == "cancelled"
    page = (await client.get(response.headers["location"])).text
    assert 'data-testid="status">cancelled<' in page


async def test_refused_action_explains_itself_on_the_page(client: httpx.AsyncClient) -> None:
    done = await submit(client, "double", data=[{"a": 1}])
    await wait_for_status(client, done["id"], "succeeded")
    waiting = await submit(client, "double", data=[{"a": 1}], run_at=later())

    cancel = await client.post(f"/ui/jobs/{done['id']}/cancel")
    retry = await client.post(f"/ui/jobs/{waiting['id']}/retry")

    assert cancel.status_code == 409
    assert cancel.headers["content-type"].startswith("text/html")
    assert 'role="alert"' in cancel.text
    assert f"job {done['id']} is succeeded (it has finished)" in cancel.text
    assert "can be cancelled" in cancel.text
    assert retry.status_code == 409
    assert "can be retried" in retry.text
    # The page still refreshes from its own address, not from the POST's.
    assert f'data-live-url="/ui/jobs/{waiting["id"]}"' in retry.text
    assert (await client.get(f"/jobs/{waiting['id']}")).json()["status"] == "queued"


async def test_unknown_job_is_a_404_page(client: httpx.AsyncClient) -> None:
    page = await client.get("/ui/jobs/no-such-job")
    retry = await client.post("/ui/jobs/no-such-job/retry")
    cancel = await client.post("/ui/jobs/no-such-job/cancel")

    assert page.status_code == 404
    assert page.headers["content-type"].startswith("text/html")
    assert "<h1>Not found</h1>" in page.text
    assert "no job &#39;no-such-job&#39;" in page.text
    assert retry.status_code == 404
    assert cancel.status_code == 404


async def test_user_data_is_escaped(client: httpx.AsyncClient) -> None:
    job = await submit(client, "boom", params={"message": XSS}, max_attempts=1)
    await wait_for_status(client, job["id"], "failed")

    pages = [
        (await client.get("/ui")).text,
        (await client.get(f"/ui/jobs/{job['id']}")).text,
        (await client.get("/ui", params={"task": XSS})).text,
        (await client.get("/ui", params={"status": XSS})).text,
    ]

    for html in pages:
        assert "<script>alert" not in html
    escaped = "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"
    assert escaped in pages[1]  # in the params, the message and the traceback
    assert pages[1].count(escaped) >= 3
    assert escaped in pages[2]


async def test_cross_site_form_post_is_refused(client: httpx.AsyncClient) -> None:
    job = await submit(client, "double", data=[{"a": 1}], run_at=later())

    forged = await client.post(
        f"/ui/jobs/{job['id']}/cancel", headers={"Origin": "https://elsewhere.example"}
    )
    same_site = await client.post(
        f"/ui/jobs/{job['id']}/cancel", headers={"Origin": "http://jobsvc"}
    )

    assert forged.status_code == 403
    assert same_site.status_code == 303
    assert (await client.get(f"/jobs/{job['id']}")).json()["status"] == "cancelled"


async def test_with_api_keys_each_key_sees_only_its_jobs(database_url: str) -> None:
    application = create_app(
        make_settings(database_url, api_keys=["key-a", "key-b"]), migrate_on_start=False
    )
    transport = httpx.ASGITransport(app=application)
    async with (
        LifespanManager(application, startup_timeout=60, shutdown_timeout=60),
        httpx.AsyncClient(transport=transport, base_url="http://jobsvc") as anonymous,
        httpx.AsyncClient(
            transport=transport, base_url="http://jobsvc", headers={"Authorization": "Bearer key-a"}
        ) as a,
        httpx.AsyncClient(
            transport=transport, base_url="http://jobsvc", headers={"Authorization": "Bearer key-b"}
        ) as b,
    ):
        job = await submit(a, "double", data=[{"a": 1}], run_at=later())

        assert (await anonymous.get("/ui")).status_code == 401
        assert listed_ids((await a.get("/ui")).text) == [job["id"]]
        assert listed_ids((await b.get("/ui")).text) == []
        assert count_of((await b.get("/ui")).text, "queued") == 0
        assert (await b.get(f"/ui/jobs/{job['id']}")).status_code == 404
        assert (await b.post(f"/ui/jobs/{job['id']}/cancel")).status_code == 404
        assert (await a.get(f"/jobs/{job['id']}")).json()["status"] == "queued"


# --- a real browser against a real server --------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def ui_server(sqlite_template: Path, tmp_path: Path) -> Iterator[str]:
    """``uvicorn`` serving the service and the dashboard on a SQLite file; its base URL."""
    database = tmp_path / "jobsvc.db"
    shutil.copyfile(sqlite_template, database)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBSVC_")}
    env.update(
        JOBSVC_DATABASE_URL=f"sqlite+aiosqlite:///{database}",
        JOBSVC_TASK_MODULES="tests.sample_tasks",
        JOBSVC_WORKERS="1",
        JOBSVC_POLL_SECONDS="0.2",
        JOBSVC_RETRY_BASE_SECONDS="0.01",
        JOBSVC_SHUTDOWN_GRACE="2",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    )
    command = [
        *(sys.executable, "-m", "uvicorn", "jobsvc.app:create_app", "--factory"),
        *("--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"),
    ]
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        # Its own session, so the server's worker processes can be ended with it.
        server = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                pytest.fail(f"the server exited:\n{log_path.read_text()}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not start:\n{log_path.read_text()}")
            time.sleep(0.05)
        yield url
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.fixture
def browser_page() -> Iterator[Any]:
    """A Playwright page in the system's Chromium (never a downloaded browser)."""
    missing = [] if CHROMIUM.exists() else [f"{CHROMIUM} (apt-get install chromium)"]
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("the playwright package (pip install playwright)")
    if missing:
        message = f"browser test needs {' and '.join(missing)}"
        if REQUIRE_BROWSER:
            pytest.fail(message + "; JOBSVC_TEST_REQUIRE_BROWSER is set", pytrace=False)
        pytest.skip(message)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            yield page
        finally:
            browser.close()


def api_submit(url: str, task: str, **body: Any) -> str:
    response = httpx.post(f"{url}/jobs", json={"task": task, "data": [{"a": 1}], **body})
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def api_wait(url: str, job_id: str, status: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (current := httpx.get(f"{url}/jobs/{job_id}").json()["status"]) != status:
        assert time.monotonic() < deadline, f"job {job_id} is {current}, never {status}"
        time.sleep(0.05)


def test_dashboard_in_a_browser(browser_page: Any, ui_server: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    page = browser_page
    url = ui_server
    page.goto(f"{url}/ui")
    expect(page.get_by_text("No jobs.")).to_be_visible()

    # A job submitted elsewhere shows up running, then succeeded, with no reload by hand.
    release = tmp_path / "release"
    held = api_submit(url, "wait_for_file", params={"path": str(release)})
    held_status = page.locator(f'tr[data-job-id="{held}"] [data-testid="status"]')
    expect(held_status).to_have_text("running", timeout=20_000)
    expect(page.get_by_test_id("count-running")).to_have_text("1")
    release.touch()
    expect(held_status).to_have_text("succeeded", timeout=20_000)
    expect(page.get_by_test_id("count-succeeded")).to_have_text("1")

    # A failed job's page shows the error; Retry runs it again (and boom fails again).
    failed = api_submit(url, "boom", params={"message": "no column 'v'"}, max_attempts=1)
    page.get_by_role("link", name=failed).click()
    expect(page.get_by_test_id("status")).to_have_text("failed", timeout=20_000)
    expect(page.locator("#error-message")).to_have_text("no column 'v'")
    page.locator("#latest-traceback summary").click()
    expect(page.locator("#latest-traceback pre")).to_contain_text("raise ValueError(message)")
    event_badges = page.locator("#job-events tbody .badge")
    expect(event_badges).to_have_text(["queued", "running", "failed"])
    page.get_by_role("button", name="Retry").click()
    expect(page).to_have_url(f"{url}/ui/jobs/{failed}")
    expect(event_badges).to_have_text(
        ["queued", "running", "failed", "queued", "running", "failed"], timeout=20_000
    )
    expect(page.get_by_test_id("status")).to_have_text("failed")
    expect(page.get_by_role("button", name="Retry")).to_be_enabled()

    screenshot = os.environ.get("JOBSVC_UI_SCREENSHOT")
    if screenshot:
        _screenshot_every_state(page, url, tmp_path, Path(screenshot), failed)


def _screenshot_every_state(page: Any, url: str, tmp_path: Path, path: Path, failed: str) -> None:
    """Jobs in all six states on the dashboard, and a failed job's page, for the README."""
    from playwright.sync_api import expect

    api_wait(url, api_submit(url, "summarize", data=[{"a": 1, "b": 2.5}]), "succeeded")
    api_submit(
        url,
        "fail_times",
        params={"counter": str(tmp_path / "n"), "failures": 5},
        max_attempts=10,
        retry_delay=3600,
    )
    gate = tmp_path / "gate"
    running = api_submit(url, "wait_for_file", params={"path": str(gate)})
    api_wait(url, running, "running")
    api_submit(url, "double", params={"factor": 3})  # waits behind the running one
    cancelled = api_submit(url, "nap", params={"seconds": 1})
    httpx.post(f"{url}/jobs/{cancelled}/cancel").raise_for_status()
    page.goto(f"{url}/ui")
    expect(page.get_by_test_id("count-retrying")).to_have_text("1", timeout=20_000)
    page.screenshot(path=str(path), full_page=True)
    page.get_by_role("link", name=failed).click()
    page.locator("#latest-traceback summary").click()
    page.screenshot(path=str(path.with_name(f"{path.stem}-job{path.suffix}")), full_page=True)
    gate.touch()
