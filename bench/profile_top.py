"""Top functions of a py-spy collapsed-stack profile: ``python -m bench.profile_top FILE [N]``.

Prints, by share of the busy samples, the functions the samples were in (self) and the
functions on the stack (inclusive). Samples whose innermost frame is a wait (a lock, a queue,
the event loop's poll, a pipe read) count as idle and are left out."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

IDLE = (
    "Condition.wait",
    "Queue.get",
    "Runner.run (asyncio/runners.py:118)",
    "Connection._recv",
    "_connection_worker_thread (aiosqlite/core.py:59)",
    "_worker (concurrent/futures/thread.py",
    "select",
    "sleep",
    "Event.wait",
    "poll",
    "accept",
    "resource_tracker.py",
)


def top(path: Path, n: int = 25) -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = idle = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        if any(marker in frames[-1] for marker in IDLE):
            idle += count
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    lines = [f"{total} busy samples ({idle} idle left out) in {path.name}", "", "self:"]
    lines += [f"  {c / total:6.1%}  {frame}" for frame, c in own.most_common(n)]
    lines += ["", "inclusive:"]
    lines += [f"  {c / total:6.1%}  {frame}" for frame, c in inclusive.most_common(n)]
    return "\n".join(lines)


if __name__ == "__main__":
    print(top(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 25))
