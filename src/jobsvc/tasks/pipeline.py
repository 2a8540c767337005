"""A pipeline of DataFrame steps described as data, so that it can travel as JSON params.

Each step is a pydantic model; ``Step`` is their union, told apart by ``op``. Everything a model
can check on its own (operators, types, value shapes) is refused at submit time; what depends on
the data (a column that is not there, a cast that does not parse) fails while the job runs, as a
``ValueError`` that names the step.

No user string ever reaches ``eval``, ``query`` or a regex: filters are masks built with plain
comparison operators, and ``contains`` is a literal substring match.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Annotated, Any, Literal, Self, TypeVar

import pandas as pd
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, FiniteFloat, model_validator
from typing_extensions import TypeAliasType

from jobsvc.tasks.progress import report_progress
from jobsvc.tasks.registry import PermanentError

H = TypeVar("H", bound=Hashable)


def _unique(items: list[H]) -> list[H]:
    duplicates = sorted({str(item) for item in items if items.count(item) > 1})
    if duplicates:
        raise ValueError(f"duplicate entries: {', '.join(duplicates)}")
    return items


ColumnName = Annotated[str, Field(min_length=1)]
ColumnList = Annotated[list[ColumnName], Field(min_length=1), AfterValidator(_unique)]
# bool comes first so that JSON true stays a bool rather than turning into 1.
Scalar = bool | int | FiniteFloat | str
Comparison = Literal[
    "==", "!=", "<", "<=", ">", ">=", "in", "not_in", "contains", "is_null", "not_null"
]
CastType = Literal["int", "float", "str", "bool", "datetime"]
Aggregation = Literal[
    "sum", "mean", "median", "min", "max", "count", "nunique", "std", "first", "last"
]


class StepError(ValueError, PermanentError):
    """A step could not be applied to the data it was given (the same data would fail the
    same way again, so the job fails at once)."""

    def __init__(self, index: int, op: str, detail: str) -> None:
        super().__init__(f"step {index} ({op}): {detail}")
        self.index = index
        self.op = op


class MissingColumnError(StepError):
    """A step names a column that the frame does not have at that point of the pipeline."""

    def __init__(self, index: int, op: str, missing: Sequence[str], available: Iterable[Any]):
        self.missing = list(missing)
        self.available = [str(column) for column in available]
        names = ", ".join(repr(name) for name in self.missing)
        noun = "column" if len(self.missing) == 1 else "columns"
        shown = ", ".join(self.available[:50]) or "(none)"
        if len(self.available) > 50:  # a wide frame should not bury the message
            shown += f", ... ({len(self.available) - 50} more)"
        super().__init__(index, op, f"{noun} {names} not found; columns are: {shown}")


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def required_columns(self) -> list[str]:
        return []

    def apply(self, df: pd.DataFrame) -> pd.DataFrame:
        raise NotImplementedError


class SelectStep(_Step):
    """Keep these columns, in this order."""

    op: Literal["select"] = "select"
    columns: ColumnList

    def required_columns(self) -> list[str]:
        return self.columns

    def apply(self, df: pd.DataFrame) -> pd.DataFrame:
        return df[self.columns]


def _unique_targets(mapping: dict[str, str]) -> dict[str, str]:
    _unique(list(mapping.values()))
    return mapping


class RenameStep(_Step):
    """Rename columns: ``{"old": "new"}``."""

    op: Literal["rename"] = "rename"
    columns: Annotated[
        dict[ColumnName, ColumnName], Field(min_length=1), AfterValidator(_unique_targets)
    ]

    def required_columns(self) -> list[str]:
        return list(self.columns)

    def apply(self, df: pd.DataFrame) -> pd.DataFrame:
        # Two columns with one name make every later step ambiguous, so refuse to create them.
        renamed = [self.columns.get(column, column) for column in df.columns]
        clashes = sorted({name for name in self.columns.values() if renamed.count(name) > 1})
        if clashes:
            raise ValueError(f"renaming would duplicate column(s) {', '.join(map(repr, clashes))}")
        return df.rename(columns=self.columns)


class FilterStep(_Step):
    """Keep the rows where ``column cmp value`` holds.

    Nulls never match a comparison (not even ``!=`` or ``not_in``), whatever the column's dtype;
    ``is_null`` and ``not_null`` are the way to select on them.
    """

    op: Literal["filter"] = "filter"
    column: ColumnName
    cmp: Comparison
    value: Scalar | list[Scalar] | None = None

    @model_validator(mode="after")
    def _value_fits_cmp(self) -> Self:
        if self.cmp in ("is_null", "not_null"):
            if self.value is not None:
                raise ValueError(f"cmp {self.cmp!r} takes no value")
        elif self.cmp in ("in", "not_in"):
            if not isinstance(self.value, list):
                raise ValueError(f"cmp {self.cmp!r} needs a list value")
        elif self.value is None:
            raise ValueError(f"cmp {self.cmp!r} needs a value")
        elif isinstance(self.value, list):
            raise ValueError(f"cmp {self.cmp!r} needs a single value, not a list")
        elif self.cmp == "contains" and not isinstance(self.value, str):
            raise ValueError("cmp 'contains' needs a string value")
        return self

    def required_columns(self) -> list[str]:
        return [self.column]

    def apply(self, df: pd.DataFrame) -> pd.DataFrame:
        return df.loc[self._mask(df[self.column])]

    def _mask(self, series: pd.Series[Any]) -> pd.Series[bool]:
        value = self.value
        if self.cmp == "is_null":
            return series.isna()
        if self.cmp == "not_null":
            return series.notna()
        if self.cmp == "contains":
            try:
                mask = series.str.contains(str(value), regex=False, na=False)
            except AttributeError:  # the .str accessor refuses non-text columns
                raise ValueError(
                    f"'contains' needs a text column; {self.column!r} is {series.dtype}"
                ) from None
            return mask.astype(bool)
        try:
            if isinstance(value, list):
                mask = series.isin(value)
                if self.cmp == "not_in":
                    mask = ~mask
            else:
                mask = _COMPARE[self.cmp](series, value)
        except TypeError as exc:
            raise ValueError(
                f"cannot compare column {self.column!r} ({series.dtype}) with {value!r}: {exc}"
            ) from exc
        # Nullable dtypes answer NA for null rows; and-ing with notna() turns that into False.
        return (mask & series.notna()).astype(bool)


_COMPARE: dict[str, Callable[[Any, Any], Any]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


class DropNullsStep(_Step):
    """Drop the rows with a null in any of ``columns`` (every column when omitted)."""

    op: Literal["drop_nulls"] = "drop_nulls"
    columns: ColumnList | None = None

    def required_columns(self) -> list[str]:
        return self.columns or []

    def apply(self, df: pd.DataFrame) -> pd.DataFrame:
        return df.dropna(subset=self.columns)


class FillNullsStep(_Step):
    """Replace nulls with ``value`` in ``columns`` (every column when omitted)."""

    op: Literal["fill_nulls"] = "fill_nulls"
    value: Scalar
    columns: ColumnList | None = None

    def required_columns(self) -> list[str]:
        return self.columns or []

    def apply(self, df: pd.DataFrame) -> pd.DataFrame:
        targets = self.columns if self.columns is not None else list(df.columns)
        result = df.copy()
        for column in targets:
            series = df[column]
            if not series.hasnans:
                continue
            # pandas warns (and later will raise) when the value does not fit the dtype, then
            # silently widens the column to object; a fill should never change a column's type.
            with warnings.catch_warnings():
                warnings.simplefilter("error", DeprecationWarning)
                warnings.simplefilter("error", FutureWarning)
                try:
                    result[column] = series.fillna(self.value)
                except (DeprecationWarning, FutureWarning, TypeError, ValueError):
                    raise ValueError(
                        f"cannot fill nulls in column {column!r} ({series.dtype}) with "
                        f"{self.value!r}; list the columns to fill"
                    ) from None
        return result


class DedupeStep(_Step):
    """Drop repeated rows, comparing ``columns`` (every column when omitted); keeps the first."""

    op: Literal["dedupe"] = "dedupe"
    columns: ColumnList | None = None

    def required_columns(self) -> list[str]:
        return self.columns or []

    def apply(self, df: pd.DataFrame) -> pd.DataFrame:
        return df.drop_duplicates(subset=self.columns)


_BOOL_WORDS = {
    "true": True,
    "t": True,
    "yes": True,
    "y": True,
    "1": True,
    "false": False,
    "f": False,
    "no": False,
    "n": False,
    "0": False,
}


def _cast(series: pd.Series[Any], to: CastType) -> pd.Series[Any]:
    numeric = pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series)
    if to in ("int", "float"):
        # to_numeric parses text strictly; astype alone would accept "1.0" for float only.
        numbers = series if numeric else pd.to_numeric(series)
        # Nullable Int64 so that a column with gaps can still become integers.
        return numbers.astype("Int64" if to == "int" else "float64")
    if to == "str":
        return series.astype("str")
    if to == "datetime":
        with warnings.catch_warnings():
            # Mixed formats parse one by one; pandas says so on every call, which is noise here.
            warnings.simplefilter("ignore", UserWarning)
            return pd.to_datetime(series)
    # astype(bool) would make every non-empty string True, "false" included.
    if numeric:
        return series.ne(0).astype("boolean").mask(series.isna())
    text = series.astype("str").str.strip().str.lower()
    flags = text.map(_BOOL_WORDS)
    bad = flags.isna() & series.notna()
    if bad.any():
        raise ValueError(f"{series[bad].iloc[0]!r} is not a boolean word (true/false/yes/no/1/0)")
    return flags.astype("boolean")


class CastStep(_Step):
    """Convert columns: ``{"a": "int"}``; int is nullable (Int64), bool is nullable (boolean)."""

    op: Literal["cast"] = "cast"
    columns: Annotated[dict[ColumnName, CastType], Field(min_length=1)]

    def required_columns(self) -> list[str]:
        return list(self.columns)

    def apply(self, df: pd.DataFrame) -> pd.DataFrame:
        result = df.copy()
        for column, to in self.columns.items():
            try:
                result[column] = _cast(df[column], to)
            except (TypeError, ValueError, OverflowError) as exc:
                raise ValueError(f"cannot cast column {column!r} to {to}: {exc}") from exc
        return result


class SortStep(_Step):
    """Sort by ``by`` (stable, so ties keep their order); nulls go last."""

    op: Literal["sort"] = "sort"
    by: ColumnList
    descending: bool = False

    def required_columns(self) -> list[str]:
        return self.by

    def apply(self, df: pd.DataFrame) -> pd.DataFrame:
        return df.sort_values(self.by, ascending=not self.descending, kind="stable")


class GroupByStep(_Step):
    """One row per group of ``by``; ``{"v": ["sum"]}`` gives a column ``v_sum``.

    Rows whose key is null form their own group instead of being dropped.
    """

    op: Literal["group_by"] = "group_by"
    by: ColumnList
    aggregations: Annotated[
        dict[
            ColumnName,
            Annotated[list[Aggregation], Field(min_length=1), AfterValidator(_unique)],
        ],
        Field(min_length=1),
    ]

    def required_columns(self) -> list[str]:
        return [*self.by, *self.aggregations]

    def apply(self, df: pd.DataFrame) -> pd.DataFrame:
        grouped = df.groupby(self.by, dropna=False, observed=True)
        results: dict[str, pd.Series[Any]] = {}
        # One aggregation at a time, so that a failure can name its column.
        for column, functions in self.aggregations.items():
            for function in functions:
                try:
                    results[f"{column}_{function}"] = grouped[column].agg(function)
                except (TypeError, ValueError) as exc:
                    raise ValueError(
                        f"cannot take {function} of column {column!r} ({df[column].dtype}): {exc}"
                    ) from exc
        return pd.DataFrame(results).reset_index()


class LimitStep(_Step):
    """Keep the first ``n`` rows."""

    op: Literal["limit"] = "limit"
    n: Annotated[int, Field(ge=0)]

    def apply(self, df: pd.DataFrame) -> pd.DataFrame:
        return df.head(self.n)


Step = TypeAliasType(
    "Step",
    Annotated[
        SelectStep
        | RenameStep
        | FilterStep
        | DropNullsStep
        | FillNullsStep
        | DedupeStep
        | CastStep
        | SortStep
        | GroupByStep
        | LimitStep,
        Field(discriminator="op"),
    ],
)
# Named aliases rather than bare Annotated: typing.get_type_hints() strips Annotated metadata
# unless asked not to, and with it the discriminator and the length limit; an alias keeps them.
StepList = TypeAliasType("StepList", Annotated[list[Step], Field(min_length=1)])


def apply_steps(df: pd.DataFrame, steps: Sequence[Step]) -> pd.DataFrame:
    """Run ``steps`` in order; step numbers in errors count from 0, like ``steps[i]``.

    Raises ``MissingColumnError`` or ``StepError`` (both ``ValueError``).
    """
    for index, step in enumerate(steps):
        missing = [column for column in step.required_columns() if column not in df.columns]
        if missing:
            raise MissingColumnError(index, step.op, missing, df.columns)
        try:
            df = step.apply(df)
        except (TypeError, ValueError) as exc:
            raise StepError(index, step.op, str(exc)) from exc
        report_progress((index + 1) / len(steps))
    return df


__all__ = [
    "CastStep",
    "DedupeStep",
    "DropNullsStep",
    "FillNullsStep",
    "FilterStep",
    "GroupByStep",
    "LimitStep",
    "MissingColumnError",
    "RenameStep",
    "SelectStep",
    "SortStep",
    "Step",
    "StepError",
    "StepList",
    "apply_steps",
]
