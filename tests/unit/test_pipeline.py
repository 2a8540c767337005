"""The pipeline task: every step against pandas' own answer, and every way it should refuse."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from jobsvc.tasks import progress
from jobsvc.tasks.pipeline import MissingColumnError, StepError, apply_steps
from jobsvc.tasks.registry import Task, import_task_modules, registry

AGGREGATIONS = ["sum", "mean", "median", "min", "max", "count", "nunique", "std", "first", "last"]


@pytest.fixture
def df() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "k": ["a", "b", "a", None, "c", "b"],
            "g": [1, 1, 2, 2, 1, 1],
            "v": [0.1, 0.7, np.nan, 2.5, 0.5, 0.9],
            "n": [3, 1, 4, 1, 5, 9],
            "s": ["apple", "Banana", None, "cherry.*", "a+b", "apple"],
        }
    )


def pipeline_task() -> Task:
    import_task_modules([])
    task = registry.get("pipeline")
    assert task is not None
    return task


def run(df: pd.DataFrame, *steps: dict[str, Any]) -> pd.DataFrame:
    """Go the way a job goes: validate, store as JSON, read back, call."""
    task = pipeline_task()
    stored = json.loads(json.dumps(task.validate_params({"steps": list(steps)})))
    result = task.call(df, stored)
    assert isinstance(result, pd.DataFrame)
    return result


# --- each step against pandas ------------------------------------------------------------------


def test_select_keeps_the_columns_in_the_order_given(df: pd.DataFrame) -> None:
    result = run(df, {"op": "select", "columns": ["v", "k"]})
    pd.testing.assert_frame_equal(result, df[["v", "k"]])


def test_rename(df: pd.DataFrame) -> None:
    result = run(df, {"op": "rename", "columns": {"k": "key", "v": "value"}})
    pd.testing.assert_frame_equal(result, df.rename(columns={"k": "key", "v": "value"}))


def test_rename_can_swap_names(df: pd.DataFrame) -> None:
    result = run(df, {"op": "rename", "columns": {"k": "s", "s": "k"}})
    pd.testing.assert_frame_equal(result, df.rename(columns={"k": "s", "s": "k"}))


def test_rename_onto_an_existing_column_is_refused(df: pd.DataFrame) -> None:
    with pytest.raises(StepError, match=r"step 0 \(rename\): .*duplicate.*'v'"):
        run(df, {"op": "rename", "columns": {"k": "v"}})


# Nulls never satisfy a comparison, so the expected masks and-in notna() where pandas would not.
FILTER_CASES: list[tuple[str, str, Any, Callable[[pd.DataFrame], pd.Series[bool]]]] = [
    ("n", "==", 1, lambda d: d["n"] == 1),
    ("v", "!=", 0.5, lambda d: (d["v"] != 0.5) & d["v"].notna()),
    ("v", "<", 0.7, lambda d: d["v"] < 0.7),
    ("v", "<=", 0.7, lambda d: d["v"] <= 0.7),
    ("v", ">", 0.5, lambda d: d["v"] > 0.5),
    ("v", ">=", 0.5, lambda d: d["v"] >= 0.5),
    ("k", "==", "a", lambda d: d["k"] == "a"),
    ("k", ">", "a", lambda d: d["k"] > "a"),
    ("n", "in", [1, 5], lambda d: d["n"].isin([1, 5])),
    ("k", "in", ["a", "c"], lambda d: d["k"].isin(["a", "c"])),
    ("k", "not_in", ["a"], lambda d: ~d["k"].isin(["a"]) & d["k"].notna()),
    ("s", "contains", "an", lambda d: d["s"].str.contains("an", regex=False, na=False)),
    ("s", "contains", ".*", lambda d: d["s"].str.contains(".*", regex=False, na=False)),
    ("s", "contains", "a+b", lambda d: d["s"] == "a+b"),
    ("v", "is_null", None, lambda d: d["v"].isna()),
    ("s", "not_null", None, lambda d: d["s"].notna()),
]


@pytest.mark.parametrize(("column", "cmp", "value", "expected_mask"), FILTER_CASES)
def test_filter(
    df: pd.DataFrame,
    column: str,
    cmp: str,
    value: Any,
    expected_mask: Callable[[pd.DataFrame], pd.Series[bool]],
) -> None:
    step: dict[str, Any] = {"op": "filter", "column": column, "cmp": cmp}
    if value is not None:
        step["value"] = value
    result = run(df, step)
    pd.testing.assert_frame_equal(result, df[expected_mask(df)])


def test_filter_contains_is_a_literal_match_not_a_regex(df: pd.DataFrame) -> None:
    result = run(df, {"op": "filter", "column": "s", "cmp": "contains", "value": ".*"})
    assert result["s"].tolist() == ["cherry.*"]


def test_filter_on_a_nullable_column_never_matches_its_nulls() -> None:
    frame = pd.DataFrame({"a": pd.array([1, None, 3], dtype="Int64")})
    result = run(frame, {"op": "filter", "column": "a", "cmp": "!=", "value": 1})
    pd.testing.assert_frame_equal(result, frame.iloc[[2]])


def test_filter_compares_dates_with_iso_strings() -> None:
    frame = pd.DataFrame({"t": pd.to_datetime(pd.Series(["2024-01-01", "2024-03-01", None]))})
    result = run(frame, {"op": "filter", "column": "t", "cmp": ">=", "value": "2024-02-01"})
    pd.testing.assert_frame_equal(result, frame[frame["t"] >= "2024-02-01"])


def test_filter_with_a_value_of_the_wrong_type_names_the_column(df: pd.DataFrame) -> None:
    with pytest.raises(StepError, match=r"step 0 \(filter\): cannot compare column 'v'"):
        run(df, {"op": "filter", "column": "v", "cmp": ">", "value": "abc"})


def test_filter_contains_on_a_number_column_is_refused(df: pd.DataFrame) -> None:
    with pytest.raises(StepError, match=r"'contains' needs a text column; 'n' is int64"):
        run(df, {"op": "filter", "column": "n", "cmp": "contains", "value": "1"})


@pytest.mark.parametrize("columns", [None, ["v"], ["k", "s"]])
def test_drop_nulls(df: pd.DataFrame, columns: list[str] | None) -> None:
    step: dict[str, Any] = {"op": "drop_nulls"}
    if columns is not None:
        step["columns"] = columns
    pd.testing.assert_frame_equal(run(df, step), df.dropna(subset=columns))


def test_fill_nulls_in_named_columns(df: pd.DataFrame) -> None:
    result = run(df, {"op": "fill_nulls", "value": 0, "columns": ["v"]})
    pd.testing.assert_frame_equal(result, df.fillna({"v": 0}))


def test_fill_nulls_everywhere() -> None:
    frame = pd.DataFrame({"a": [1.0, None], "b": [None, 2.5], "c": [1, 2]})
    result = run(frame, {"op": "fill_nulls", "value": -1})
    pd.testing.assert_frame_equal(result, frame.fillna(-1))


def test_fill_nulls_with_text(df: pd.DataFrame) -> None:
    result = run(df, {"op": "fill_nulls", "value": "?", "columns": ["k", "s"]})
    pd.testing.assert_frame_equal(result, df.fillna({"k": "?", "s": "?"}))


def test_fill_nulls_refuses_a_value_that_does_not_fit_the_column(df: pd.DataFrame) -> None:
    # Left to itself pandas would turn the float column into object, with a warning.
    with pytest.raises(StepError, match=r"cannot fill nulls in column 'v' \(float64\) with 'x'"):
        run(df, {"op": "fill_nulls", "value": "x"})


@pytest.mark.parametrize("columns", [None, ["k"], ["k", "g"]])
def test_dedupe(df: pd.DataFrame, columns: list[str] | None) -> None:
    frame = pd.concat([df, df.iloc[[0, 3]]], ignore_index=True)
    step: dict[str, Any] = {"op": "dedupe"}
    if columns is not None:
        step["columns"] = columns
    pd.testing.assert_frame_equal(run(frame, step), frame.drop_duplicates(subset=columns))


def test_cast_int_float_str() -> None:
    frame = pd.DataFrame({"i": ["1", "2", None], "f": ["1.5", None, "3"], "s": [1.5, 2.0, None]})
    result = run(frame, {"op": "cast", "columns": {"i": "int", "f": "float", "s": "str"}})
    expected = frame.assign(
        i=pd.array([1, 2, None], dtype="Int64"),
        f=pd.to_numeric(frame["f"]).astype("float64"),
        s=frame["s"].astype("str"),
    )
    pd.testing.assert_frame_equal(result, expected)


def test_cast_whole_floats_to_int() -> None:
    frame = pd.DataFrame({"a": [1.0, np.nan, 3.0]})
    result = run(frame, {"op": "cast", "columns": {"a": "int"}})
    pd.testing.assert_frame_equal(result, frame.astype({"a": "Int64"}))


def test_cast_bool_reads_words_and_numbers() -> None:
    frame = pd.DataFrame({"w": ["true", "No", " YES ", None, "0"], "n": [0, 2, -1, 0, 1]})
    result = run(frame, {"op": "cast", "columns": {"w": "bool", "n": "bool"}})
    expected = pd.DataFrame(
        {
            "w": pd.array([True, False, True, None, False], dtype="boolean"),
            "n": pd.array([False, True, True, False, True], dtype="boolean"),
        }
    )
    pd.testing.assert_frame_equal(result, expected)


def test_cast_datetime() -> None:
    frame = pd.DataFrame({"t": ["2024-01-01", "2024-02-29", None]})
    result = run(frame, {"op": "cast", "columns": {"t": "datetime"}})
    pd.testing.assert_frame_equal(result, frame.assign(t=pd.to_datetime(frame["t"])))


@pytest.mark.parametrize(
    ("values", "to"),
    [
        (["1", "abc"], "int"),
        (["1.5", "x"], "float"),
        ([1.5, 2.0], "int"),  # truncating would lose data silently
        (["yes", "maybe"], "bool"),
        (["2024-01-01", "abc"], "datetime"),
    ],
)
def test_cast_that_fails_names_the_column_and_type(values: list[Any], to: str) -> None:
    frame = pd.DataFrame({"price": values})
    with pytest.raises(ValueError, match=rf"step 0 \(cast\): cannot cast column 'price' to {to}"):
        run(frame, {"op": "cast", "columns": {"price": to}})


@pytest.mark.parametrize("descending", [False, True])
def test_sort(df: pd.DataFrame, descending: bool) -> None:
    result = run(df, {"op": "sort", "by": ["g", "v"], "descending": descending})
    expected = df.sort_values(["g", "v"], ascending=not descending, kind="stable")
    pd.testing.assert_frame_equal(result, expected)


def test_sort_is_stable_and_puts_nulls_last(df: pd.DataFrame) -> None:
    result = run(df, {"op": "sort", "by": ["k"]})
    assert result.index.tolist() == [0, 2, 1, 5, 4, 3]


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_group_by_each_aggregation(df: pd.DataFrame, aggregation: str) -> None:
    result = run(df, {"op": "group_by", "by": ["k"], "aggregations": {"v": [aggregation]}})
    expected = df.groupby(["k"], dropna=False, as_index=False).agg(
        **{f"v_{aggregation}": ("v", aggregation)}
    )
    pd.testing.assert_frame_equal(result, expected)


def test_group_by_names_columns_and_keeps_keys_as_columns(df: pd.DataFrame) -> None:
    result = run(
        df,
        {
            "op": "group_by",
            "by": ["k", "g"],
            "aggregations": {"v": ["sum", "mean"], "s": ["first"]},
        },
    )
    assert result.columns.tolist() == ["k", "g", "v_sum", "v_mean", "s_first"]
    assert isinstance(result.index, pd.RangeIndex)
    expected = df.groupby(["k", "g"], dropna=False, as_index=False).agg(
        v_sum=("v", "sum"), v_mean=("v", "mean"), s_first=("s", "first")
    )
    pd.testing.assert_frame_equal(result, expected)


def test_group_by_keeps_the_null_key_group(df: pd.DataFrame) -> None:
    result = run(df, {"op": "group_by", "by": ["k"], "aggregations": {"n": ["sum"]}})
    assert result["k"].isna().sum() == 1
    assert result["n_sum"].sum() == df["n"].sum()


def test_group_by_a_numeric_aggregation_of_text_names_the_column(df: pd.DataFrame) -> None:
    with pytest.raises(StepError, match=r"step 0 \(group_by\): cannot take mean of column 's'"):
        run(df, {"op": "group_by", "by": ["k"], "aggregations": {"s": ["mean"]}})


@pytest.mark.parametrize("n", [0, 2, 100])
def test_limit(df: pd.DataFrame, n: int) -> None:
    pd.testing.assert_frame_equal(run(df, {"op": "limit", "n": n}), df.head(n))


def test_chained_steps(df: pd.DataFrame) -> None:
    result = run(
        df,
        {"op": "rename", "columns": {"v": "price"}},
        {"op": "drop_nulls", "columns": ["k"]},
        {"op": "filter", "column": "price", "cmp": ">", "value": 0.2},
        {"op": "fill_nulls", "value": 0, "columns": ["price"]},
        {"op": "cast", "columns": {"g": "str"}},
        {"op": "group_by", "by": ["k"], "aggregations": {"price": ["sum"], "n": ["max"]}},
        {"op": "sort", "by": ["price_sum"], "descending": True},
        {"op": "limit", "n": 2},
    )
    frame = df.rename(columns={"v": "price"}).dropna(subset=["k"])
    frame = frame[frame["price"] > 0.2].fillna({"price": 0}).astype({"g": "str"})
    frame = frame.groupby(["k"], dropna=False, as_index=False).agg(
        price_sum=("price", "sum"), n_max=("n", "max")
    )
    expected = frame.sort_values(["price_sum"], ascending=False, kind="stable").head(2)
    pd.testing.assert_frame_equal(result, expected)


def test_apply_steps_leaves_the_input_alone(df: pd.DataFrame) -> None:
    before = df.copy()
    run(
        df,
        {"op": "fill_nulls", "value": 0, "columns": ["v"]},
        {"op": "cast", "columns": {"n": "float"}},
        {"op": "rename", "columns": {"k": "key"}},
    )
    pd.testing.assert_frame_equal(df, before)


def test_progress_is_reported_after_each_step(df: pd.DataFrame) -> None:
    seen: list[float] = []
    progress.set_sink(seen.append)
    try:
        run(df, {"op": "limit", "n": 5}, {"op": "limit", "n": 4}, {"op": "limit", "n": 3})
    finally:
        progress.set_sink(None)
    assert seen == pytest.approx([1 / 3, 2 / 3, 1.0])


# --- missing columns ----------------------------------------------------------------------------

MISSING_COLUMN_STEPS: list[dict[str, Any]] = [
    {"op": "select", "columns": ["k", "nope"]},
    {"op": "rename", "columns": {"nope": "x"}},
    {"op": "filter", "column": "nope", "cmp": "==", "value": 1},
    {"op": "filter", "column": "nope", "cmp": "is_null"},
    {"op": "drop_nulls", "columns": ["nope"]},
    {"op": "fill_nulls", "value": 0, "columns": ["nope"]},
    {"op": "dedupe", "columns": ["nope"]},
    {"op": "cast", "columns": {"nope": "int"}},
    {"op": "sort", "by": ["nope"]},
    {"op": "group_by", "by": ["nope"], "aggregations": {"v": ["sum"]}},
    {"op": "group_by", "by": ["k"], "aggregations": {"nope": ["sum"]}},
]


@pytest.mark.parametrize("step", MISSING_COLUMN_STEPS, ids=lambda s: str(s["op"]))
def test_missing_column_in_each_step_kind(df: pd.DataFrame, step: dict[str, Any]) -> None:
    with pytest.raises(MissingColumnError) as caught:
        run(df, {"op": "limit", "n": 10}, step)
    message = str(caught.value)
    assert f"step 1 ({step['op']}): column 'nope' not found" in message
    assert message.endswith("columns are: k, g, v, n, s")
    assert caught.value.missing == ["nope"]
    assert isinstance(caught.value, ValueError)


def test_missing_column_message_in_full() -> None:
    frame = pd.DataFrame({"a": [1], "b": [2]})
    steps: list[dict[str, Any]] = [
        {"op": "select", "columns": ["a", "b"]},
        {"op": "rename", "columns": {"b": "c"}},
    ]
    with pytest.raises(MissingColumnError) as caught:
        run(frame, *steps, {"op": "filter", "column": "price", "cmp": ">", "value": 0})
    assert str(caught.value) == "step 2 (filter): column 'price' not found; columns are: a, c"


def test_a_column_renamed_away_is_missing_afterwards(df: pd.DataFrame) -> None:
    with pytest.raises(MissingColumnError, match=r"step 1 \(sort\): column 'v' not found"):
        run(df, {"op": "rename", "columns": {"v": "w"}}, {"op": "sort", "by": ["v"]})


def test_every_missing_column_is_named(df: pd.DataFrame) -> None:
    with pytest.raises(MissingColumnError, match=r"columns 'x', 'y' not found"):
        run(df, {"op": "select", "columns": ["x", "k", "y"]})


# --- params validation --------------------------------------------------------------------------

INVALID_PARAMS: list[dict[str, Any]] = [
    {},
    {"steps": []},
    {"steps": "select"},
    {"steps": [{"columns": ["a"]}]},
    {"steps": [{"op": "explode", "columns": ["a"]}]},
    {"steps": [{"op": "select", "columns": ["a"]}], "extra": 1},
    {"steps": [{"op": "select", "columns": ["a"], "extra": 1}]},
    {"steps": [{"op": "select", "columns": []}]},
    {"steps": [{"op": "select", "columns": ["a", "a"]}]},
    {"steps": [{"op": "select", "columns": [""]}]},
    {"steps": [{"op": "rename", "columns": {}}]},
    {"steps": [{"op": "rename", "columns": {"a": "x", "b": "x"}}]},
    {"steps": [{"op": "filter", "column": "a", "cmp": "~=", "value": 1}]},
    {"steps": [{"op": "filter", "column": "a", "cmp": "in", "value": 1}]},
    {"steps": [{"op": "filter", "column": "a", "cmp": "not_in", "value": "a"}]},
    {"steps": [{"op": "filter", "column": "a", "cmp": "==", "value": [1, 2]}]},
    {"steps": [{"op": "filter", "column": "a", "cmp": ">"}]},
    {"steps": [{"op": "filter", "column": "a", "cmp": "contains", "value": 1}]},
    {"steps": [{"op": "filter", "column": "a", "cmp": "is_null", "value": 1}]},
    {"steps": [{"op": "filter", "column": "a", "cmp": "==", "value": {"x": 1}}]},
    {"steps": [{"op": "filter", "column": "a", "cmp": "==", "value": float("nan")}]},
    {"steps": [{"op": "filter", "cmp": "==", "value": 1}]},
    {"steps": [{"op": "drop_nulls", "columns": []}]},
    {"steps": [{"op": "fill_nulls", "columns": ["a"]}]},
    {"steps": [{"op": "fill_nulls", "value": None}]},
    {"steps": [{"op": "dedupe", "columns": "a"}]},
    {"steps": [{"op": "cast", "columns": {"a": "decimal"}}]},
    {"steps": [{"op": "cast", "columns": {}}]},
    {"steps": [{"op": "sort", "by": []}]},
    {"steps": [{"op": "sort", "by": ["a"], "descending": "maybe"}]},
    {"steps": [{"op": "group_by", "by": [], "aggregations": {"v": ["sum"]}}]},
    {"steps": [{"op": "group_by", "by": ["k"], "aggregations": {}}]},
    {"steps": [{"op": "group_by", "by": ["k"], "aggregations": {"v": []}}]},
    {"steps": [{"op": "group_by", "by": ["k"], "aggregations": {"v": ["mode"]}}]},
    {"steps": [{"op": "group_by", "by": ["k"], "aggregations": {"v": "sum"}}]},
    {"steps": [{"op": "limit", "n": -1}]},
    {"steps": [{"op": "limit", "n": 1.5}]},
    {"steps": [{"op": "limit"}]},
]


@pytest.mark.parametrize("params", INVALID_PARAMS, ids=lambda p: json.dumps(p, default=str))
def test_invalid_params_are_refused_at_validation(params: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        pipeline_task().validate_params(params)


def test_validation_messages_point_at_the_problem() -> None:
    bad = {"steps": [{"op": "limit", "n": 1}, {"op": "filter", "column": "a", "cmp": "in"}]}
    with pytest.raises(ValidationError) as caught:
        pipeline_task().validate_params(bad)
    (error,) = caught.value.errors()
    assert error["loc"][:2] == ("steps", 1)
    assert "cmp 'in' needs a list value" in error["msg"]


def test_validated_params_are_stored_with_defaults_as_json() -> None:
    params = pipeline_task().validate_params(
        {
            "steps": [
                {"op": "sort", "by": ["a"]},
                {"op": "filter", "column": "a", "cmp": "not_null"},
                {"op": "dedupe"},
                {"op": "filter", "column": "a", "cmp": "==", "value": True},
            ]
        }
    )
    assert params == {
        "steps": [
            {"op": "sort", "by": ["a"], "descending": False},
            {"op": "filter", "column": "a", "cmp": "not_null", "value": None},
            {"op": "dedupe", "columns": None},
            {"op": "filter", "column": "a", "cmp": "==", "value": True},
        ]
    }
    assert pipeline_task().validate_params(params) == params


def test_params_schema_is_json_with_the_step_union() -> None:
    schema = pipeline_task().params_schema()
    text = json.dumps(schema)
    assert schema["required"] == ["steps"]
    assert '"propertyName": "op"' in text
    assert '"minItems": 1' in text
    for op in ["select", "rename", "filter", "drop_nulls", "fill_nulls", "dedupe", "cast"]:
        assert f'"const": "{op}"' in text


def test_apply_steps_takes_step_models_directly(df: pd.DataFrame) -> None:
    from jobsvc.tasks.pipeline import FilterStep, LimitStep

    result = apply_steps(df, [FilterStep(column="n", cmp=">", value=2), LimitStep(n=2)])
    pd.testing.assert_frame_equal(result, df[df["n"] > 2].head(2))


# --- injection ----------------------------------------------------------------------------------


@pytest.fixture
def no_evaluation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every pandas entry point that evaluates expressions fail loudly if it is reached."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an expression evaluator was called")

    monkeypatch.setattr(pd, "eval", refuse)
    monkeypatch.setattr(pd.DataFrame, "eval", refuse)
    monkeypatch.setattr(pd.DataFrame, "query", refuse)


def payloads(marker: Path) -> list[str]:
    return [
        f"@__import__('os').system('touch {marker}')",
        f"__import__('os').system('touch {marker}')",
        "@__import__('os').system('touch /tmp/pwned')",
        "__import__('os')",
        f"`x` == 1 or @__import__('os').system('touch {marker}')",
        f"(?{{__import__('os').system('touch {marker}')}})",
        "a).*(b",
    ]


@pytest.mark.usefixtures("no_evaluation")
def test_injection_payloads_are_plain_strings(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    fixed_marker = Path("/tmp/pwned")  # noqa: S108 - the path one payload names
    fixed_marker_existed = fixed_marker.exists()
    for payload in payloads(marker):
        frame = pd.DataFrame({payload: [payload, "other", None], "v": [1, 2, 3]})
        as_column: list[dict[str, Any]] = [
            {"op": "filter", "column": payload, "cmp": "==", "value": payload},
            {"op": "filter", "column": payload, "cmp": "contains", "value": payload},
            {"op": "filter", "column": payload, "cmp": "in", "value": [payload]},
        ]
        for step in as_column:
            result = run(frame, step)
            pd.testing.assert_frame_equal(result, frame.iloc[[0]])

        result = run(frame, {"op": "filter", "column": "v", "cmp": "==", "value": payload})
        assert result.empty
        result = run(frame, {"op": "filter", "column": payload, "cmp": "!=", "value": payload})
        pd.testing.assert_frame_equal(result, frame.iloc[[1]])

        result = run(
            frame,
            {"op": "rename", "columns": {"v": f"{payload} 2"}},
            {"op": "select", "columns": [f"{payload} 2", payload]},
            {"op": "sort", "by": [payload]},
            {"op": "fill_nulls", "value": payload, "columns": [payload]},
            {"op": "dedupe", "columns": [payload]},
            {"op": "cast", "columns": {payload: "str"}},
            {"op": "group_by", "by": [payload], "aggregations": {f"{payload} 2": ["sum"]}},
        )
        assert result.columns.tolist() == [payload, f"{payload} 2_sum"]
        assert sorted(result[payload]) == sorted([payload, "other"])

        with pytest.raises(MissingColumnError) as caught:
            run(frame, {"op": "sort", "by": [payload + "!"]})
        assert repr(payload + "!") in str(caught.value)

    assert not marker.exists()
    assert fixed_marker_existed or not fixed_marker.exists()
