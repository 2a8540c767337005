"""Turning bytes into DataFrames and back: uploads in, results out.

Pure functions, and CPU-heavy ones: the service runs them in worker processes (the task
workers, or the API's converter pool), never on the event loop. Inputs and results are stored
as Parquet (columnar, compressed, typed); JSON records submitted inline are kept as JSON.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.feather as feather
import pyarrow.parquet as pq

from jobsvc import scan
from jobsvc.errors import InvalidData, TooLarge, UnsupportedMediaType
from jobsvc.files import RESULT_FILE_MIN_BYTES, fsync_directory
from jobsvc.lifecycle import ResultData

CSV = "text/csv"
NDJSON = "application/x-ndjson"
PARQUET = "application/vnd.apache.parquet"
JSON_MEDIA = "application/json"
UPLOAD_TYPES = (CSV, NDJSON, PARQUET)
TEXT_UPLOADS = (CSV, NDJSON)  # parsed to be checked; Parquet says its shape in its footer
_ALIASES = {
    "application/csv": CSV,
    "application/jsonl": NDJSON,
    "application/jsonlines": NDJSON,
    "application/x-jsonlines": NDJSON,
    "application/parquet": PARQUET,
    "application/x-parquet": PARQUET,
}
# A spreadsheet runs a cell that starts with one of these as a formula (OWASP: CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def normalise_media_type(content_type: str | None) -> str:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return _ALIASES.get(media, media)


@dataclass(frozen=True)
class Limits:
    max_rows: int
    max_columns: int
    max_cell_chars: int


@dataclass(frozen=True)
class ParsedUpload:
    format: str  # 'parquet' (bytes in ``data``), or the kept upload's ('csv', 'ndjson', ...)
    data: bytes | None
    rows: int
    columns: int
    sha256: str  # empty unless asked for (an Idempotency-Key binds to it)
    size_bytes: int


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _check_shape(rows: int, columns: int, limits: Limits) -> None:
    if columns > limits.max_columns:
        raise TooLarge(f"the data has {columns} columns; the limit is {limits.max_columns}")
    if rows > limits.max_rows:
        # A text upload is read no further than one row past the limit: "more than" is all
        # that is known of it.
        raise TooLarge(
            f"the data has more than {limits.max_rows} rows; the limit is {limits.max_rows}"
        )


def _check_cells(frame: pd.DataFrame, limits: Limits) -> None:
    for column in frame.columns:
        values = frame[column]
        if pd.api.types.is_numeric_dtype(values) or pd.api.types.is_datetime64_any_dtype(values):
            continue
        if not isinstance(values.dtype, pd.StringDtype):  # mixed values: measure their text
            values = values.astype("string")
        longest = values.str.len().max()
        if pd.notna(longest) and int(longest) > limits.max_cell_chars:
            raise TooLarge(
                f"column {column!r} has a cell of {int(longest)} characters; "
                f"the limit is {limits.max_cell_chars}"
            )


@dataclass(frozen=True)
class EncodedRecords:
    """Submitted records, checked, as the compact JSON a job's input keeps."""

    payload: bytes
    rows: int
    columns: int


def encode_records(records: list[dict[str, Any]], limits: Limits) -> EncodedRecords:
    columns = check_records(records, limits)
    payload = json.dumps(records, separators=(",", ":"), default=str).encode()
    return EncodedRecords(payload, len(records), columns)


def check_records(records: list[dict[str, Any]], limits: Limits) -> int:
    """Check submitted records against the limits; their number of columns."""
    columns = max((len(record) for record in records), default=0)
    _check_shape(len(records), columns, limits)
    for record in records:
        for name, value in record.items():
            if isinstance(value, str) and len(value) > limits.max_cell_chars:
                raise TooLarge(
                    f"field {name!r} has a value of {len(value)} characters; "
                    f"the limit is {limits.max_cell_chars}"
                )
    return columns


def as_frame(data: Any) -> pd.DataFrame:
    if isinstance(data, pd.DataFrame):
        return data
    raise TypeError(
        f"the data is {type(data).__name__}; a task's data is a DataFrame or a list of records"
    )


def frame_to_parquet(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


# An upload kept as it came: its media type and its ``job_inputs.format``.
_KEPT_FORMATS = {CSV: "csv", NDJSON: "ndjson", PARQUET: "parquet"}


def stored_format(media_type: str) -> str:
    """The ``job_inputs.format`` of an upload kept as it came: 'csv', 'ndjson' or 'parquet'."""
    kept = _KEPT_FORMATS.get(media_type)
    if kept is None:
        raise UnsupportedMediaType(
            f"content type {media_type!r} is not accepted; use one of {', '.join(UPLOAD_TYPES)}"
        )
    return kept


def parse_upload(
    path: str,
    media_type: str,
    limits: Limits,
    *,
    cache_at: str | None = None,
    durable_cache: bool = False,
    digest: bool = False,
) -> ParsedUpload:
    """Read an uploaded file and check it against the limits.

    Without ``cache_at``, return it as Parquet bytes (an input kept in the database). With
    it, the caller keeps the upload itself as a file: return no bytes, and leave the parsed
    table of a CSV or NDJSON upload at ``cache_at`` as an Arrow file for the worker to map
    (fsynced only when ``durable_cache``; see ``files``), if the disk has room for it.
    """
    if cache_at is not None and media_type in TEXT_UPLOADS:
        parsed, frame = read_kept_upload(path, media_type, limits, digest=digest)
        table = pa.Table.from_pandas(frame, preserve_index=False)
        # The copy only saves the worker a parse: a disk without room for it (or any other
        # refusal) costs that parse, never the upload, which is already stored whole.
        with contextlib.suppress(OSError):
            write_arrow_file(table, Path(cache_at), durable=durable_cache)
        return parsed
    file, sha256, size = _opened(path, digest)
    if media_type == PARQUET:
        rows, columns = _check_parquet(file, limits)
        if cache_at is not None:  # the worker reads the kept file; nothing to cache
            return ParsedUpload("parquet", None, rows, columns, sha256, size)
        return ParsedUpload("parquet", file.read_bytes(), rows, columns, sha256, size)
    frame = _read_text_table(file, media_type, limits)
    data = frame_to_parquet(frame)
    return ParsedUpload("parquet", data, len(frame), len(frame.columns), sha256, len(data))


def read_kept_upload(
    path: str, media_type: str, limits: Limits, *, digest: bool = False
) -> tuple[ParsedUpload, pd.DataFrame]:
    """A CSV or NDJSON upload that is kept as a file, parsed and checked: what its
    ``job_inputs`` row says of it, and its table."""
    file, sha256, size = _opened(path, digest)
    frame = _read_text_table(file, media_type, limits)
    parsed = ParsedUpload(
        stored_format(media_type), None, len(frame), len(frame.columns), sha256, size
    )
    return parsed, frame


def _opened(path: str, digest: bool) -> tuple[Path, str, int]:
    """An upload's path, its SHA-256 (if asked for) and size; ``InvalidData`` if empty."""
    file = Path(path)
    sha256 = _sha256_of(file) if digest else ""
    size = file.stat().st_size
    if size == 0:
        raise InvalidData("the uploaded file is empty")
    return file, sha256, size


def _read_text_table(file: Path, media_type: str, limits: Limits | None) -> pd.DataFrame:
    """A CSV or NDJSON file's table. With ``limits``, its lines are checked before pandas
    reads it (``scan``), and pandas reads no more than one row past the limit; without, it is
    a kept upload that was checked when it came."""
    if media_type not in TEXT_UPLOADS:
        raise UnsupportedMediaType(
            f"content type {media_type!r} is not accepted; use one of {', '.join(UPLOAD_TYPES)}"
        )
    kind = "CSV" if media_type == CSV else "NDJSON"
    nrows = None
    if limits is not None:
        columns = limits.max_columns if media_type == CSV else None
        if scan.check_lines(file, limits.max_cell_chars, columns) >= limits.max_rows:
            nrows = limits.max_rows + 1  # only then: it costs pandas a third of its speed
    try:
        if media_type == CSV:
            frame = pd.read_csv(file, nrows=nrows)
        else:
            frame = pd.read_json(file, lines=True, nrows=nrows)
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        if "out of memory" in str(error):  # how pandas' tokenizer says it
            raise MemoryError from None
        # UnicodeDecodeError and pandas' parser errors are ValueErrors too.
        raise InvalidData(f"the {kind} cannot be parsed: {_one_line(error)}") from None
    if len(frame.columns) == 0:
        raise InvalidData(f"the {kind} holds no data (no columns)")
    if limits is not None:
        _check_shape(len(frame), len(frame.columns), limits)
        _check_cells(frame, limits)
    frame.columns = [str(column) for column in frame.columns]
    return frame


def _check_parquet(file: Path, limits: Limits) -> tuple[int, int]:
    """A Parquet upload's rows and columns, read and checked with bounded memory.

    Its footer says its shape, and may lie: one of 200,000 columns takes 0.9 s and 540 MB to
    decode, so the decoder refuses lists longer than the limits allow before it reads them.
    The data is then decoded a batch at a time, so that the worker reads a file known to be
    whole, with no cell over the limit.
    """
    items = max(4 * limits.max_columns, 100_000)  # a column takes up to ~4 schema entries
    try:
        with pq.ParquetFile(file, thrift_container_size_limit=items) as parquet:
            metadata = parquet.metadata
            _check_shape(metadata.num_rows, metadata.num_columns, limits)
            rows = 0
            batch_rows = max(1, (1 << 22) // max(1, metadata.num_columns))  # ~4 M cells
            for batch in parquet.iter_batches(batch_size=batch_rows):
                rows += batch.num_rows
                for name, column in zip(batch.schema.names, batch.columns, strict=True):
                    longest = _longest_value(column)
                    if longest > limits.max_cell_chars:
                        raise TooLarge(
                            f"column {name!r} has a cell of {longest} characters; "
                            f"the limit is {limits.max_cell_chars}"
                        )
    except MemoryError:  # Arrow's is an ArrowException too: not the file's fault
        raise
    except OSError as error:
        if error.errno == errno.ENOMEM:
            raise
        if "Exceeded size limit" in str(error):
            raise TooLarge(
                f"the Parquet footer is larger than the limits allow (more than {items} "
                f"columns or row groups); the limit is {limits.max_columns} columns"
            ) from None
        raise InvalidData(f"the body is not a readable Parquet file: {error}") from None
    except pa.ArrowException as error:
        raise InvalidData(f"the body is not a readable Parquet file: {error}") from None
    if rows != metadata.num_rows:
        raise InvalidData(
            f"the Parquet file's footer says {metadata.num_rows} rows; its data holds {rows}"
        )
    return rows, metadata.num_columns


def _longest_value(column: pa.Array) -> int:
    """The longest text (in characters) or binary value (in bytes) of a column; 0 for others."""
    if pa.types.is_dictionary(column.type):
        column = column.dictionary
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        lengths = pc.utf8_length(column)
    elif pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        lengths = pc.binary_length(column)
    else:
        return 0
    return int(pc.max(lengths).as_py() or 0)


def write_arrow_file(table: pa.Table, target: Path, *, durable: bool = True) -> int:
    """Write ``table`` as an uncompressed Arrow IPC file (a reader maps it, no decoding),
    fsynced with its directory entry before this returns unless not ``durable``; its size."""
    try:
        if not target.parent.is_dir():  # not made at start (a read-only disk then, say)
            target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("wb") as out:
            feather.write_feather(table, out, compression="uncompressed")
            if durable:
                out.flush()
                os.fsync(out.fileno())
        if durable:
            fsync_directory(target.parent)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return target.stat().st_size


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


# --- a function's arguments (jobs made by ``add_task``) ---------------------------------------

_FRAME_MARK = "$jobsvc.dataframe"


def to_storable(value: Any, where: str) -> Any:
    """``value`` as plain JSON (DataFrames as Parquet); ``TypeError`` naming ``where`` if it
    holds something that cannot be stored."""
    if value is None or isinstance(value, bool | int | float | str):
        if isinstance(value, float) and not math.isfinite(value):
            raise TypeError(f"{where} is {value!r}, which JSON cannot store")
        return value
    if isinstance(value, pd.DataFrame):
        return {_FRAME_MARK: base64.b64encode(frame_to_parquet(value)).decode()}
    if isinstance(value, list | tuple):
        return [to_storable(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, dict):
        encoded = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} has a key {key!r} that is not a string")
            encoded[key] = to_storable(item, f"{where}[{key!r}]")
        return encoded
    raise TypeError(
        f"{where} is {type(value).__module__}.{type(value).__qualname__}, which cannot be "
        "stored with the job: arguments must be JSON types (str, int, float, bool, None, "
        "lists, dicts with string keys) or pandas DataFrames"
    )


def encode_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """A call's arguments as stored bytes; ``TypeError`` naming the first that cannot be."""
    payload = {
        "args": [to_storable(value, f"argument {i + 1}") for i, value in enumerate(args)],
        "kwargs": {
            name: to_storable(value, f"argument {name!r}") for name, value in kwargs.items()
        },
    }
    return json.dumps(payload, separators=(",", ":")).encode()


def _decode_argument(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode_argument(item) for item in value]
    if isinstance(value, dict):
        if set(value) == {_FRAME_MARK}:
            return pd.read_parquet(io.BytesIO(base64.b64decode(value[_FRAME_MARK])))
        return {key: _decode_argument(item) for key, item in value.items()}
    return value


def decode_call(data: bytes) -> tuple[list[Any], dict[str, Any]]:
    payload = json.loads(data)
    return _decode_argument(payload["args"]), _decode_argument(payload["kwargs"])


# --- in the task worker ---------------------------------------------------------------------


_KEPT_TEXT = {kept: media for media, kept in _KEPT_FORMATS.items() if media in TEXT_UPLOADS}


def load_input(
    format: str, data: bytes | None, path: str | None = None, cache: str | None = None
) -> pd.DataFrame:
    """A job's input as a DataFrame. A kept CSV or NDJSON upload is read from its parsed copy
    ``cache`` when that exists (written at submit, in this boot), else parsed again."""
    if path is not None:
        if format in _KEPT_TEXT:
            if cache is not None and os.path.exists(cache):
                return _map_arrow(cache)
            # Checked when it was accepted: parsed again as it is.
            return _read_text_table(Path(path), _KEPT_TEXT[format], None)
        if format == "parquet":
            return pd.read_parquet(path)
        if format == "arrow":  # an upload kept by an earlier version
            return _map_arrow(path)
    if data is None:
        return pd.DataFrame()
    if format == "parquet":
        return pd.read_parquet(io.BytesIO(data))
    if format == "json":
        return pd.DataFrame.from_records(json.loads(data))
    raise ValueError(f"unknown input format {format!r}")


def encode_result(value: Any, file: str | None = None) -> ResultData:
    """A task's return value as it is stored: Parquet, a JSON object, or nothing. With
    ``file``, a large DataFrame is written there as an Arrow file instead of Parquet bytes."""
    if value is None:
        return ResultData("none")
    if isinstance(value, pd.Series):
        value = value.to_frame()
    if isinstance(value, pd.DataFrame):
        frame = value.reset_index() if _has_meaningful_index(value) else value
        frame.columns = [str(column) for column in frame.columns]
        if file is not None and frame.memory_usage(deep=True).sum() >= RESULT_FILE_MIN_BYTES:
            table = pa.Table.from_pandas(frame, preserve_index=False)
            write_arrow_file(table, Path(file))
            return ResultData("dataframe", rows=len(frame), path=Path(file).name)
        return ResultData("dataframe", data=frame_to_parquet(frame), rows=len(frame))
    if isinstance(value, dict):
        try:
            # Round-trip to be sure the stored value is plain JSON (no NaN, no numpy types).
            plain = json.loads(json.dumps(value, allow_nan=False, default=_json_default))
        except (TypeError, ValueError) as error:
            raise TypeError(f"the task returned a dict that is not JSON: {error}") from None
        return ResultData("json", value=plain)
    raise TypeError(
        f"the task returned {type(value).__name__}; a task returns a DataFrame, a dict or None"
    )


def _has_meaningful_index(frame: pd.DataFrame) -> bool:
    # A named index (set_index, a group-by key) is data; unnamed labels left by a filter or
    # a sort are only row numbers, and would come back as a stray "index" column.
    return any(name is not None for name in frame.index.names)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        item = value.item()
        if isinstance(item, float) and not math.isfinite(item):
            return None
        return item
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# --- rendering results (the API's converter pool) ------------------------------------------


def _map_arrow(path: str) -> pd.DataFrame:
    frame: pd.DataFrame = feather.read_table(path, memory_map=True).to_pandas()
    return frame


def _stored_frame(source: bytes | str) -> pd.DataFrame:
    """A stored DataFrame result: Parquet bytes, or the path of an Arrow file."""
    if isinstance(source, str):
        return _map_arrow(source)
    return pd.read_parquet(io.BytesIO(source))


def render_parquet(source: bytes | str) -> bytes:
    if isinstance(source, bytes):
        return source
    return frame_to_parquet(_stored_frame(source))


def render_json(source: bytes | str) -> bytes:
    """A stored DataFrame as a JSON list of records, the shape ``data`` has in a submit."""
    return _stored_frame(source).to_json(orient="records", date_format="iso").encode()


def _neutralise(cell: Any) -> Any:
    if isinstance(cell, str) and cell.startswith(_FORMULA_START):
        return "'" + cell
    return cell


def render_csv(source: bytes | str) -> bytes:
    """A stored DataFrame as CSV, with text cells that a spreadsheet would run defused."""
    frame = _stored_frame(source)
    frame.columns = [_neutralise(str(column)) for column in frame.columns]
    for column in frame.columns:
        if not pd.api.types.is_numeric_dtype(frame[column]):
            frame[column] = frame[column].map(_neutralise)
    return frame.to_csv(index=False).encode()
