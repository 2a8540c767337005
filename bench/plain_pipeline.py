"""The plain-pandas reference for the big-data benchmark, run as its own process:
``python -m bench.plain_pipeline IN.csv OUT.csv``. Prints the seconds from just after the
imports to the result written (import time excluded, as jobsvc's warm workers have none),
then the process's peak RSS in bytes and its RSS once pandas was imported."""

from __future__ import annotations

import resource
import sys
import time

import pandas as pd


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def main(source: str, target: str) -> None:
    imported = peak_rss()
    started = time.perf_counter()
    df = pd.read_csv(source)
    df = df[df["x"] > 0.25]
    result = (
        df.groupby("key", dropna=False, observed=True)
        .agg(y_sum=("y", "sum"), y_mean=("y", "mean"), n_max=("n", "max"))
        .reset_index()
        .sort_values("y_sum", ascending=False, kind="stable")
    )
    result.to_csv(target, index=False)
    elapsed = time.perf_counter() - started
    print(elapsed, peak_rss(), imported)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
