"""The work both example apps do: pandas on the records an endpoint received."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pandas as pd


def process_data(data: list[dict[str, Any]], batch: str) -> None:
    """Summarise the records and write the summary to $EXAMPLE_OUT_DIR/<batch>.json."""
    frame = pd.DataFrame(data)
    # Stands in for heavier pandas work, so a restart can land in the middle of it.
    time.sleep(float(os.environ.get("EXAMPLE_WORK_SECONDS", "0")))
    out_dir = Path(os.environ.get("EXAMPLE_OUT_DIR", "."))
    (out_dir / f"{batch}.json").write_text(frame.describe().to_json())
