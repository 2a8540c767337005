"""The procrastinate peer: the same pandas work as jobsvc's summarize, on PostgreSQL.

The connection string comes from ``BENCH_PROCRASTINATE_DSN``; workers run as
``procrastinate --app=bench.procrastinate_peer.app worker``.
"""

from __future__ import annotations

import os
from typing import Any

import pandas as pd
from procrastinate import App, PsycopgConnector

app = App(connector=PsycopgConnector(conninfo=os.environ.get("BENCH_PROCRASTINATE_DSN", "")))


@app.task(name="summarize")
def summarize(records: list[dict[str, Any]]) -> None:
    pd.DataFrame(records).describe()
