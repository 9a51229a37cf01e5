"""Arrow side of the dataset contract: split files, opening Parquet, column type checks, id columns.

Every error is a ``DataError`` naming the file, column and row. Used by the vocabulary build, the
encoder, the stream and ``recsys data check``; it imports nothing else of ``recsys.data`` but the
schema.

Example::

    files = split_files("data/ml100k-ctr", "train")      # [Path, ...]
    check_columns(schema, open_parquet(files[0]).schema_arrow, files[0])
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys.data.schema import FeatureType, Schema

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """A data file breaks the contract; the message names the file, column and row."""


def split_files(data_dir: str | Path, split: str) -> list[Path]:
    """Parquet files of ``split``: ``<dir>/<split>/*.parquet`` or ``<dir>/<split>.parquet``."""
    data_dir = Path(data_dir)
    folder, single = data_dir / split, data_dir / f"{split}.parquet"
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if not files and single.exists():
        files = [single]
    if not files:
        raise DataError(
            f"{data_dir}: split {split!r} has no Parquet files (looked for {folder}/*.parquet and {single})"
        )
    return files


def open_parquet(file: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(file)
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise DataError(f"{file}: cannot read as Parquet: {err}") from err


def _is_id_type(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


FLOAT32_MAX = float(np.finfo(np.float32).max)


def bad_numbers(x: np.ndarray) -> np.ndarray:
    """Numeric values a model cannot take: missing, NaN, inf, or beyond float32's range (|x| > 3.4e38,
    which becomes inf in the model's float32 and overflows the statistics)."""
    with np.errstate(invalid="ignore"):
        return ~np.isfinite(x) | (np.abs(x) > FLOAT32_MAX)


def column_problems(schema: Schema, arrow_schema: pa.Schema, file: Path) -> list[str]:
    """Every missing, duplicated or mistyped column of ``file``, each message naming the file and column."""
    names = set(arrow_schema.names)
    missing = [c for c in schema.columns() if c not in names]
    problems = [f"{file}: missing column(s) {missing} required by {schema.source}"] if missing else []
    for column in schema.columns():
        count = arrow_schema.names.count(column)
        if count > 1:
            problems.append(f"{file}: column {column!r} appears {count} times; which one is meant is ambiguous")

    def wrong(column: str, want: str) -> str:
        return f"{file}: column {column!r} has type {arrow_schema.field(column).type}, expected {want}"

    if schema.label in names and arrow_schema.names.count(schema.label) == 1:
        label_type = arrow_schema.field(schema.label).type
        if not (pa.types.is_integer(label_type) or pa.types.is_boolean(label_type) or pa.types.is_floating(label_type)):
            problems.append(wrong(schema.label, "a 0/1 integer, boolean or float label"))
    if (
        schema.group
        and arrow_schema.names.count(schema.group) == 1
        and not _is_id_type(arrow_schema.field(schema.group).type)
    ):
        problems.append(wrong(schema.group, "an integer or string group id"))
    for f in schema.features:
        if f.name not in names or arrow_schema.names.count(f.name) > 1:
            continue
        t = arrow_schema.field(f.name).type
        if f.type is FeatureType.CATEGORICAL and not _is_id_type(t):
            problems.append(wrong(f.name, "an integer or string id (categorical)"))
        elif f.type in (FeatureType.CATEGORICAL_LIST, FeatureType.SEQUENCE):
            if not (_is_list(t) and _is_id_type(t.value_type)):
                problems.append(wrong(f.name, f"a list of integer or string ids ({f.type.value})"))
        elif f.type is FeatureType.NUMERIC and not (
            pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
        ):
            problems.append(wrong(f.name, "a number (numeric)"))
        elif f.type is FeatureType.TEXT and not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            problems.append(wrong(f.name, "a string (text)"))
    return problems


def check_columns(schema: Schema, arrow_schema: pa.Schema, file: Path) -> None:
    """Raises ``DataError`` naming the file and column when a column is missing or mistyped."""
    problems = column_problems(schema, arrow_schema, file)
    if problems:
        raise DataError(problems[0])


def id_kind(t: pa.DataType) -> str:
    """ "int", "str", "list<int>" or "list<str>": what decides how ids are looked up."""
    if _is_list(t):
        return f"list<{id_kind(t.value_type)}>"
    if pa.types.is_dictionary(t):
        t = t.value_type
    return "int" if pa.types.is_integer(t) else "str" if _is_id_type(t) else str(t)


def log_extra_columns(schema: Schema, arrow_schema: pa.Schema, file: Path) -> None:
    """Names the columns of ``file`` that the schema does not use (when a stream plans its reads)."""
    extra = sorted(set(arrow_schema.names) - set(schema.columns()))
    if extra:
        log.info("%s: ignoring column(s) not in the schema: %s", file, extra)


def flat_ids(column: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """(flattened values, lengths[int64]) of a scalar or list column; null lists are empty."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if _is_list(column.type):
        lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy().astype(np.int64)
        return pc.list_flatten(column), lengths
    return column, np.ones(len(column), dtype=np.int64)
