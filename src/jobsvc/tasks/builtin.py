"""The tasks that ship with the service; ``import_task_modules`` always imports this module."""

from __future__ import annotations

from typing import Any

import pandas as pd

from jobsvc.tasks.pipeline import StepList, apply_steps
from jobsvc.tasks.registry import task
from jobsvc.tasks.summarize import summarize_frame


@task(name="summarize")
def summarize(df: pd.DataFrame) -> dict[str, Any]:
    """Per-column statistics: count, nulls, unique, and mean/std/quantiles for numbers."""
    return summarize_frame(df)


@task(name="pipeline")
def pipeline(df: pd.DataFrame, steps: StepList) -> pd.DataFrame:
    """Apply steps in order: select, rename, filter, drop_nulls, fill_nulls, dedupe, cast, sort,
    group_by, limit. Each step is an object with an ``op`` and that op's fields."""
    return apply_steps(df, steps)
