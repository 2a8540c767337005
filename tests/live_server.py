"""A real ``jobsvc serve`` in a subprocess, for the CLI and crash tests (a helper, not tests).

The server runs in its own session, so its process group holds the server, its fork server
and its worker processes: ``kill9`` ends them all at once, as a machine losing power would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def server_env(database_url: str, **extra: str) -> dict[str, str]:
    """The environment of a test server (also what a CLI subprocess needs for ``db`` commands)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBSVC_")}
    pythonpath = [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env.update(
        JOBSVC_DATABASE_URL=database_url,
        JOBSVC_TASK_MODULES="tests.sample_tasks",
        JOBSVC_WORKERS="1",
        JOBSVC_POLL_SECONDS="0.2",
        JOBSVC_RETRY_BASE_SECONDS="0.01",
        JOBSVC_SHUTDOWN_GRACE="2",
        PYTHONPATH=os.pathsep.join(pythonpath),
    )
    env.update(extra)
    return env


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group ``pgid``, read from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone while we looked
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != "Z":
            members.append(int(entry.name))
    return members


class LiveServer:
    command = "serve"
    ready_path = "/healthz"

    def __init__(self, database_url: str, log_path: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = server_env(database_url, **env)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> LiveServer:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv(),
                env=self.env,
                cwd=REPO_ROOT if self.command == "app" else self.log_path.parent,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wait_until_ready()
        return self

    def argv(self) -> list[str]:
        command = [sys.executable, "-m", "jobsvc.cli", self.command]
        if self.command == "serve":
            command += ["--port", str(self.port)]
        return command

    @property
    def pid(self) -> int:
        assert self.process is not None, "the server was not started"
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_until_ready(self, timeout: float = START_TIMEOUT) -> None:
        assert self.process is not None
        if self.command == "worker":
            self._wait_for_log("worker ready", timeout)
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"jobsvc serve exited with {self.process.returncode}:\n" + self.log()
                )
            try:
                if httpx.get(self.url + self.ready_path, timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.05)
        self.kill9()
        raise RuntimeError(f"jobsvc serve did not answer within {timeout:g} s:\n" + self.log())

    def _wait_for_log(self, text: str, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill9()
                raise RuntimeError(f"jobsvc {self.command} never became ready:\n" + self.log())
            time.sleep(0.05)

    def kill9(self) -> None:
        """SIGKILL to the whole process group (server, fork server, workers), then reap."""
        if self.process is None:
            return
        pgid = self.process.pid  # the session leader: its pid is the group's id
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        self.process.wait()
        self._wait_group_gone(pgid)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM to the server (a graceful stop); SIGKILL to the group if it hangs."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
        # Whatever still runs in the group (a stuck worker) must not outlive the test.
        self._kill_leftovers()
        return self.process.returncode

    def _kill_leftovers(self) -> None:
        if self.process is None:
            return
        if group_members(self.process.pid):
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            self._wait_group_gone(self.process.pid)

    @staticmethod
    def _wait_group_gone(pgid: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while (left := group_members(pgid)) and time.monotonic() < deadline:
            time.sleep(0.02)
        if left:
            raise RuntimeError(f"processes {left} of group {pgid} survived SIGKILL")

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        if self.process is not None and self.process.poll() is None:
            self.terminate()
        else:
            self._kill_leftovers()


class LiveWorker(LiveServer):
    """A real ``jobsvc worker``: workers only, no HTTP."""

    command = "worker"


class LiveApp(LiveServer):
    """Any ASGI app (``module:attribute``) under uvicorn, ready when ``ready_path`` answers."""

    command = "app"

    def __init__(
        self, target: str, database_url: str, log_path: Path, ready_path: str, **env: str
    ) -> None:
        super().__init__(database_url, log_path, **env)
        self.target = target
        self.ready_path = ready_path

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "uvicorn", self.target, "--port", str(self.port)]
