"""The child processes jobsvc starts (worker processes, converter processes): how they are
started, at what priority, and why they never act on a stop signal.

Every child comes from a fork server, itself started with SIGINT and SIGTERM blocked. A stop
sent to the whole process group (Ctrl-C in a terminal, ``systemctl stop`` with the default
``KillMode=control-group``) therefore reaches only the main process, which decides what the
running jobs become: a child that died of the signal, or a fork server whose death made every
child look dead (multiprocessing reports its children as exited with status 255 then), would
cost each running job an attempt.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import multiprocessing
import multiprocessing.forkserver
import os
import resource
import signal
import threading
from collections.abc import Callable, Iterator
from multiprocessing.context import BaseContext
from typing import Any

import pyarrow as pa

# Children yield the CPU to the API process: a slow job should never slow a request.
NICENESS = 10
# Heavy numeric libraries would start a thread per core; the API needs one of them.
THREAD_LIMITS = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
}
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})
_PRELOAD = ["jobsvc.runner.child"]
_started_lock = threading.Lock()


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Block SIGINT and SIGTERM in this thread meanwhile: a process started from it (fork and
    exec keep the mask) never sees them. The main process receives them as before."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def process_context() -> BaseContext:
    """The multiprocessing context for every process jobsvc starts.

    A fork server: the service process has threads (the event loop's helpers, the database
    driver's), which a plain fork would copy in an unknown state. The server preloads the
    worker's module, so pandas is imported once and every worker is a cheap fork of it.
    """
    for name, value in THREAD_LIMITS.items():
        # Set before the fork server starts, so its imports and every worker see them.
        os.environ.setdefault(name, value)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    with _started_lock, stop_signals_blocked():
        multiprocessing.forkserver.ensure_running()
    return context


def ignore_stop_signals() -> None:
    """In a child: SIGINT and SIGTERM are the main process's to act on (see the module)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def start_child(memory_mb: int | None = None) -> None:
    """A converter process's start: lower priority, stop signals ignored, its memory capped."""
    ignore_stop_signals()
    os.nice(NICENESS)
    # pydantic's Rust code panics when an allocation fails, and a panic's backtrace is
    # resolved with more allocations: with RUST_BACKTRACE=1, a process at its cap hung there
    # (asleep, 3.2 GB resident) instead of ending, and its call never returned.
    os.environ["RUST_BACKTRACE"] = "0"
    cap_growth(memory_mb)


def cap_growth(megabytes: int | None) -> None:
    """Let this process's address space grow by ``megabytes`` at most (RLIMIT_AS): past it an
    allocation fails (``MemoryError``) instead of the process growing until the kernel's
    out-of-memory killer takes it, or another process. Counted from what is mapped now,
    since pandas and Arrow map 1.4 GB at import (reserved, not resident)."""
    if megabytes is None:
        return
    limit = _mapped_bytes() + (megabytes << 20)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


@contextlib.contextmanager
def growth_capped(megabytes: int | None) -> Iterator[None]:
    """``cap_growth`` for a while: a worker process that does the API's conversion work
    (``runner.idle_work``) is held to a converter's cap meanwhile, and to its own after."""
    if megabytes is None:
        yield
        return
    previous = resource.getrlimit(resource.RLIMIT_AS)
    cap_growth(megabytes)
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, previous)


def _mapped_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[0]) * _PAGE_BYTES


# --- memory ----------------------------------------------------------------------------------

_RELEASE_AFTER_GROWTH_BYTES = 16 * 1024 * 1024
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def call_and_release(func: Callable[[], Any]) -> Any:
    """``func()``, then the memory it grew by handed back (for the API's conversions, which
    parse uploads and render results in a converter process)."""
    resident = resident_bytes()
    try:
        return func()
    finally:
        release_memory_above(resident)


def release_memory_above(resident: int) -> None:
    """Hand freed memory back to the system when the process has grown by a large job.

    malloc and Arrow's allocator keep what a job freed for their next allocations, so a
    process idle after parsing a 39 MB CSV held 120 MB more than before it; with a worker
    process per core that adds up. A small job skips this: trimming costs a heap walk.
    """
    if resident_bytes() - resident < _RELEASE_AFTER_GROWTH_BYTES:
        return
    pa.default_memory_pool().release_unused()
    if _malloc_trim is not None:
        _malloc_trim(0)


# This process's /proc/self/statm, opened once: a read is then 2 µs, where opening it for each
# job cost 20 µs (1.8% of a small job). Keyed by pid, since a forked child inherits the fd.
_statm: tuple[int, int] | None = None


def resident_bytes() -> int:
    global _statm
    try:
        if _statm is None or _statm[0] != os.getpid():
            _statm = (os.getpid(), os.open("/proc/self/statm", os.O_RDONLY))
        return int(os.pread(_statm[1], 128, 0).split()[1]) * _PAGE_BYTES
    except (OSError, IndexError, ValueError):  # not Linux: nothing to measure, nothing done
        return 0


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``; None on a C library without one (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


_malloc_trim = _find_malloc_trim()
