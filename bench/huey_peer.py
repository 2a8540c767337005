"""The huey peer: SqliteHuey at synchronous=FULL, doing the same pandas work as jobsvc's
``summarize`` task (the same function, on a DataFrame of the same records).

The database file comes from ``BENCH_HUEY_DB``; the consumer runs as
``python -m huey.bin.huey_consumer bench.huey_peer.huey -w 2 -k process``.
"""

from __future__ import annotations

import os
from typing import Any

import pandas as pd
from huey import SqliteHuey

from jobsvc.tasks.summarize import summarize_frame

huey = SqliteHuey(filename=os.environ.get("BENCH_HUEY_DB", "huey.db"), fsync=True)


@huey.task()
def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    return summarize_frame(pd.DataFrame(records))
