"""Property tests of the pipeline's params: any step list the schema admits either runs or
fails the job with a StepError naming what is wrong; anything else is refused up front."""

from __future__ import annotations

from typing import Any, get_args

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from jobsvc.tasks import registry
from jobsvc.tasks.builtin import pipeline  # noqa: F401 - registers the task
from jobsvc.tasks.pipeline import Step, StepError

STEP_TYPES = get_args(Step.__value__)[0]  # the union inside Annotated[..., discriminator]

COLUMNS = ["k", "v", "s", "missing"]  # "missing" is never in the frame
FRAME = pd.DataFrame(
    {
        "k": ["a", "b", "a", None, "c"],
        "v": [1.5, None, 3.0, -2.0, 0.0],
        "s": ["x", "=1+1", "", "y", None],
    }
)
TASK = registry.get("pipeline")

columns = st.lists(st.sampled_from(COLUMNS), min_size=1, max_size=3, unique=True)
scalars = st.one_of(st.integers(-5, 5), st.floats(-5, 5), st.text(max_size=5), st.booleans())
steps = st.one_of(
    st.builds(lambda c: {"op": "select", "columns": c}, columns),
    st.builds(
        lambda c, new: {"op": "rename", "columns": {c: new}},
        st.sampled_from(COLUMNS),
        st.text(min_size=1, max_size=4),
    ),
    st.builds(
        lambda c, cmp, v: {"op": "filter", "column": c, "cmp": cmp, "value": v},
        st.sampled_from(COLUMNS),
        st.sampled_from(["==", "!=", "<", "<=", ">", ">=", "contains"]),
        scalars,
    ),
    st.builds(
        lambda c, cmp, v: {"op": "filter", "column": c, "cmp": cmp, "value": v},
        st.sampled_from(COLUMNS),
        st.sampled_from(["in", "not_in"]),
        st.lists(scalars, max_size=3),
    ),
    st.builds(
        lambda c, cmp: {"op": "filter", "column": c, "cmp": cmp},
        st.sampled_from(COLUMNS),
        st.sampled_from(["is_null", "not_null"]),
    ),
    st.builds(lambda c: {"op": "drop_nulls", "columns": c}, columns),
    st.builds(lambda v: {"op": "fill_nulls", "value": v}, scalars),
    st.builds(lambda c: {"op": "dedupe", "columns": c}, columns),
    st.builds(
        lambda c, t: {"op": "cast", "columns": {c: t}},
        st.sampled_from(COLUMNS),
        st.sampled_from(["int", "float", "str", "bool", "datetime"]),
    ),
    st.builds(lambda c, d: {"op": "sort", "by": c, "descending": d}, columns, st.booleans()),
    st.builds(
        lambda by, c, aggs: {"op": "group_by", "by": by, "aggregations": {c: aggs}},
        columns,
        st.sampled_from(COLUMNS),
        st.lists(
            st.sampled_from(
                ["sum", "mean", "median", "min", "max", "count", "nunique", "std", "first", "last"]
            ),
            min_size=1,
            max_size=3,
            unique=True,
        ),
    ),
    st.builds(lambda n: {"op": "limit", "n": n}, st.integers(0, 10)),
)


@given(st.lists(steps, min_size=1, max_size=5))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_admitted_step_list_runs_or_fails_clearly(step_list: list[dict[str, Any]]) -> None:
    assert TASK is not None
    try:
        params = TASK.validate_params({"steps": step_list})
    except ValidationError:
        return  # refused up front (a 422 at submit): fine, nothing ran
    try:
        result = TASK.call(FRAME.copy(), params)
    except StepError as error:
        message = str(error)
    else:
        assert isinstance(result, pd.DataFrame)
        return
    assert message.startswith("step ")  # names the step that failed


def _not_an_op(name: str) -> bool:
    ops = {get_args(step.model_fields["op"].annotation)[0] for step in get_args(STEP_TYPES)}
    return name not in ops


@given(
    st.one_of(
        st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
        # Not a real op: some (dedupe, drop_nulls) are complete without any other field.
        st.builds(lambda op: {"steps": [{"op": op}]}, st.text(max_size=8).filter(_not_an_op)),
        st.builds(lambda n: {"steps": [{"op": "limit", "n": n}]}, st.integers(max_value=-1)),
        st.just({"steps": []}),
        st.builds(
            lambda cmp: {"steps": [{"op": "filter", "column": "v", "cmp": cmp, "value": 1}]},
            st.text(max_size=4).filter(
                lambda c: c not in {"==", "!=", "<", "<=", ">", ">=", "contains"}
            ),
        ),
    )
)
@settings(max_examples=200, deadline=None)
def test_malformed_params_are_refused_before_anything_runs(params: dict[str, Any]) -> None:
    assert TASK is not None
    with pytest.raises(ValidationError):
        TASK.validate_params(params)
