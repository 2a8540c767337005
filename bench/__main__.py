"""Run the benchmarks side by side, write bench/results/latest.md and print it.

``python -m bench`` runs them all; ``python -m bench accept bigdata`` runs the ones named.
"""

from __future__ import annotations

import importlib
import platform
import sys
import time
import traceback

from bench.common import RESULTS, Row, stop_all

BENCHMARKS = [
    "accept",
    "responsive",
    "bigdata",
    "small_jobs",
    "latency",
    "status_reads",
    "postgres",
    "big_table",
]


def render(rows: list[Row], seconds: float) -> str:
    lines = [
        "| benchmark | jobsvc | reference | ratio | target | met? |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        met = {True: "yes", False: "**no**", None: "-"}[row.met]
        cells = [row.benchmark, row.jobsvc, row.reference, row.ratio, row.target, met]
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    lines += ["", "Notes:", ""]
    for row in rows:
        for note in row.notes:
            lines.append(f"- {row.benchmark.split(' ', 1)[0]} {note}")
    uname = platform.uname()
    lines += [
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M')} on {uname.system} {uname.machine}, "
        f"{_cores()} cores, Python {platform.python_version()}; {seconds:.0f} s in all.",
    ]
    return "\n".join(lines) + "\n"


def _cores() -> int:
    import os

    return os.cpu_count() or 0


def main(names: list[str]) -> int:
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
        return 2
    started = time.monotonic()
    rows: list[Row] = []
    failed = False
    try:
        for name in names or BENCHMARKS:
            module = importlib.import_module(f"bench.{name}")
            try:
                rows += module.run()
            except Exception as error:
                failed = True
                traceback.print_exc()
                rows.append(
                    Row(name, "error", "", "", "", False, [f"{type(error).__name__}: {error}"])
                )
            finally:
                stop_all()
    finally:
        stop_all()
    table = render(rows, time.monotonic() - started)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.md").write_text(table)
    print()
    print(table)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
