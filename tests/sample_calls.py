"""Plain module-level functions, queued with ``add_task`` as an app queues its own code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd


def process_data(data: list[dict[str, Any]], out: str) -> None:
    """What an endpoint hands to BackgroundTasks: pandas work on the posted records."""
    frame = pd.DataFrame(data)
    Path(out).write_text(frame.describe().to_json())


def total(frame: pd.DataFrame, column: str) -> dict[str, Any]:
    return {"total": float(frame[column].sum())}
