"""summarize_frame: pandas' describe() figures, as strict JSON."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from jobsvc.tasks.registry import import_task_modules, registry
from jobsvc.tasks.summarize import summarize_frame

NUMERIC_STATS = ["mean", "std", "min", "25%", "50%", "75%", "max"]


@pytest.fixture
def df() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "f": [1.5, np.nan, 3.0, 4.25, np.nan, 10.0],
            "i": [3, 1, 4, 1, 5, 9],
            "n": pd.array([1, None, 2, 2, None, 7], dtype="Int64"),
            "s": ["a", "b", None, "a", "c", "a"],
            "b": [True, False, True, True, False, True],
            "t": pd.to_datetime(
                pd.Series(["2024-01-01", None, "2024-01-01", "2024-03-05", None, None])
            ),
        }
    )


def strict_json(value: Any) -> Any:
    return json.loads(json.dumps(value, allow_nan=False))


def same_number(ours: Any, pandas: Any) -> bool:
    if pd.isna(pandas):
        return ours is None
    return isinstance(ours, int | float) and math.isclose(ours, float(pandas))


@pytest.mark.parametrize("column", ["f", "i", "n"])
def test_numeric_stats_are_describe(df: pd.DataFrame, column: str) -> None:
    stats = summarize_frame(df)["columns"][column]
    described = df[column].describe()
    for key in NUMERIC_STATS:
        assert same_number(stats[key], described[key]), key
    assert stats["count"] == described["count"] == df[column].count()
    assert "top" not in stats


@pytest.mark.parametrize("column", ["f", "i", "n", "s", "b", "t"])
def test_counts_nulls_and_unique(df: pd.DataFrame, column: str) -> None:
    stats = summarize_frame(df)["columns"][column]
    series = df[column]
    assert stats["dtype"] == str(series.dtype)
    assert stats["count"] == series.count()
    assert stats["nulls"] == series.isna().sum()
    assert stats["count"] + stats["nulls"] == len(df)
    assert stats["unique"] == series.nunique()
    assert all(type(stats[key]) is int for key in ("count", "nulls", "unique"))


@pytest.mark.parametrize("column", ["s", "b"])
def test_other_columns_get_describes_top_and_freq(df: pd.DataFrame, column: str) -> None:
    stats = summarize_frame(df)["columns"][column]
    described = df[column].describe()
    assert stats["top"] == described["top"]
    assert stats["freq"] == described["freq"]
    assert "mean" not in stats


def test_bool_is_not_treated_as_a_number(df: pd.DataFrame) -> None:
    stats = summarize_frame(df)["columns"]["b"]
    assert stats["top"] is True
    assert stats["freq"] == 4


def test_timestamps_become_iso_strings(df: pd.DataFrame) -> None:
    stats = summarize_frame(df)["columns"]["t"]
    assert stats["top"] == "2024-01-01T00:00:00"
    assert stats["freq"] == 2


def test_rows_and_every_column_present(df: pd.DataFrame) -> None:
    summary = summarize_frame(df)
    assert summary["rows"] == 6
    assert list(summary["columns"]) == list(df.columns)


def test_nan_becomes_none() -> None:
    frame = pd.DataFrame({"x": [np.nan, np.nan], "one": [1.0, np.nan], "o": [None, None]})
    columns = summarize_frame(frame)["columns"]
    assert columns["x"]["count"] == 0
    assert all(columns["x"][key] is None for key in NUMERIC_STATS)
    # A single value has a mean but no standard deviation.
    assert columns["one"]["mean"] == 1.0
    assert columns["one"]["std"] is None
    assert columns["o"]["top"] is None
    assert columns["o"]["freq"] == 0


def test_empty_frame() -> None:
    frame = pd.DataFrame({"a": pd.Series([], dtype="float64"), "b": pd.Series([], dtype="str")})
    summary = strict_json(summarize_frame(frame))
    assert summary["rows"] == 0
    assert summary["columns"]["a"]["count"] == 0
    assert summary["columns"]["a"]["mean"] is None
    assert summary["columns"]["b"]["top"] is None
    assert summarize_frame(pd.DataFrame()) == {"rows": 0, "columns": {}}


def test_awkward_values_are_strict_json() -> None:
    frame = pd.DataFrame(
        {
            "inf": [1.0, np.inf, -np.inf],
            "f32": np.array([1.5, np.nan, 2.5], dtype="float32"),
            "u8": np.array([1, 2, 3], dtype="uint8"),
            "td": pd.to_timedelta(["1s", None, "1s"]),
            "tz": pd.to_datetime(pd.Series(["2024-01-01T10:00:00Z", None, "2024-01-01T10:00:00Z"])),
            "cat": pd.Categorical(["x", "y", "x"]),
            "lists": [[1, 2], [1, 2], None],
            "mixed": [1, "a", None],
            "bool_na": pd.array([True, None, True], dtype="boolean"),
        }
    )
    summary = summarize_frame(frame)
    assert strict_json(summary) == summary
    columns = summary["columns"]
    assert columns["inf"]["max"] is None
    assert columns["td"]["top"] == "P0DT0H0M1S"
    assert columns["tz"]["top"] == "2024-01-01T10:00:00+00:00"
    assert columns["cat"]["top"] == "x"
    assert columns["lists"]["unique"] == 1
    assert columns["lists"]["top"] == "[1, 2]"
    assert columns["u8"]["max"] == 3.0
    assert columns["bool_na"]["top"] is True


def test_non_string_column_names_become_keys() -> None:
    summary = summarize_frame(pd.DataFrame({0: [1, 2], ("a", "b"): ["x", "y"]}))
    assert list(summary["columns"]) == ["0", "('a', 'b')"]
    strict_json(summary)


def test_summarize_task_takes_no_params(df: pd.DataFrame) -> None:
    import_task_modules([])
    task = registry.get("summarize")
    assert task is not None
    assert task.validate_params({}) == {}
    with pytest.raises(ValidationError):
        task.validate_params({"columns": ["a"]})
    assert task.call(df, {}) == summarize_frame(df)
    json.dumps(task.params_schema())
