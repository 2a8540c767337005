"""Per-column statistics of a DataFrame, as plain JSON values."""

from __future__ import annotations

import math
from datetime import date, datetime, time, timedelta
from typing import Any

import numpy as np
import pandas as pd

_NUMERIC_STATS = ("mean", "std", "min", "25%", "50%", "75%", "max")


def summarize_frame(df: pd.DataFrame) -> dict[str, Any]:
    """``{"rows": n, "columns": {name: stats}}``, safe for ``json.dumps(allow_nan=False)``.

    Numbers get the figures of ``Series.describe()``; every other column (bool, text, dates)
    gets its most frequent value as ``top`` and that value's count as ``freq``.
    """
    return {
        "rows": len(df),
        "columns": {str(name): _summarize_column(series) for name, series in df.items()},
    }


def _summarize_column(series: pd.Series[Any]) -> dict[str, Any]:
    stats: dict[str, Any] = {
        "dtype": str(series.dtype),
        "count": int(series.count()),
        "nulls": int(series.isna().sum()),
    }
    try:
        stats["unique"] = int(series.nunique())
    except TypeError:  # lists or dicts in an object column cannot be hashed; their text can
        series = series.map(repr, na_action="ignore")
        stats["unique"] = int(series.nunique())
    # describe() treats bool as a category rather than a number, and so does this.
    if pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series):
        # inf - inf is NaN in a quantile or a mean: the figure is reported as None, and
        # numpy's warning about it would only be noise in the worker's log.
        with np.errstate(invalid="ignore", over="ignore"):
            described = series.describe()
        stats.update({key: _json_value(described[key]) for key in _NUMERIC_STATS})
    else:
        counts = series.value_counts()
        stats["top"] = _json_value(counts.index[0]) if len(counts) else None
        stats["freq"] = int(counts.iloc[0]) if len(counts) else 0
    return stats


def _json_value(value: Any) -> Any:
    """A Python value that ``json.dumps(allow_nan=False)`` accepts; str() as the last resort."""
    # datetime64.item() gives a bare integer of nanoseconds, so go through pandas first.
    if isinstance(value, np.datetime64):
        value = pd.Timestamp(value)
    elif isinstance(value, np.timedelta64):
        value = pd.Timedelta(value)
    elif isinstance(value, np.generic):
        value = value.item()
    if value is None or value is pd.NaT or value is pd.NA:
        return None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return pd.Timedelta(value).isoformat()
    return str(value)


__all__ = ["summarize_frame"]
