"""Vocabularies and numeric statistics, built from the train split only and saved beside the data.

Row 0 of every table is the OOV row: ids unseen in train (or rarer than ``min_count``), nulls,
and, for hashed features, missing values. Known ids take rows 1..n by descending train count.

Files (rebuilt automatically when the train files or schema change)::

    <dir>/vocab/<table>.parquet   value, count      (one row per known id, row i -> table row i+1)
    <dir>/vocab/<table>.buckets.parquet  count      (hashed tables: train occurrences per row)
    <dir>/vocab/meta.json         table sizes, numeric mean/std, train column types, fingerprints

Two fingerprints: ``source_fingerprint`` (schema + train files' names, sizes, times) decides when to
rebuild; the content fingerprints (schema, every vocabulary in row order, hash bucket counts,
numeric statistics — no file times) are what a model depends on: a checkpoint records them and
evaluation, export, test and predict refuse data whose content differs (``check_same_content``),
while an identical copy of the dataset passes.

Example::

    vocab = Vocabulary.load_or_build("data/ml100k-ctr")
    vocab.num_embeddings("item_id")                         # 1 + distinct train items
    vocab.lookup("item_id", pa.array([50, 999999]))        # array([k, 0]): unknown -> OOV row 0
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from recsys.data.arrow import (
    DataError,
    bad_numbers,
    check_columns,
    flat_ids,
    id_kind,
    open_parquet,
    split_files,
)
from recsys.data.days import day_split, partitions
from recsys.data.schema import ID_TYPES, Schema, load_schema, parse_schema

if TYPE_CHECKING:  # pandas is imported where it is used: a command's --help needs none of it
    import pandas as pd

log = logging.getLogger(__name__)

FORMAT_VERSION = 3


def hash_bucket(values: pa.Array, num_buckets: int) -> np.ndarray:
    """Stable hash of ints or strings into rows 1..num_buckets (row 0: null). Same on every platform."""
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    nulls = values.is_null().to_numpy(zero_copy_only=False)
    array = values.to_numpy(zero_copy_only=False)
    if pa.types.is_integer(values.type):
        array = np.where(nulls, 0, array).astype(np.int64) if nulls.any() else array.astype(np.int64)
    else:
        array = np.where(nulls, "", array).astype(object)
    import pandas as pd

    hashed = pd.util.hash_array(array)  # siphash with a fixed key: stable across processes
    rows = (hashed % np.uint64(num_buckets)).astype(np.int64) + 1
    rows[nulls] = 0
    return rows


NULL_RAW_ID = -(2**63)  # a null raw id (`vocabulary: none`): int64's minimum, one id like any other


def raw_ids(values: pa.Array) -> np.ndarray:
    """The int64 ids of a ``vocabulary: none`` column: integers as they are (uint64 by their bits, so a
    value past 2⁶³ − 1 wraps to a negative id), strings through pandas' SipHash with its fixed key
    (stable across processes and platforms), nulls and int64's maximum (the managed tables' marker of a
    free slot) ``NULL_RAW_ID``. No vocabulary, no pass over the data: the table kind hashes or manages
    these ids."""
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    nulls = values.is_null().to_numpy(zero_copy_only=False)
    if pa.types.is_integer(values.type):
        filled = pc.fill_null(values, 0).to_numpy(zero_copy_only=False)
        ids = filled.view(np.int64) if filled.dtype == np.uint64 else filled.astype(np.int64)
    else:
        import pandas as pd

        array = np.where(nulls, "", values.to_numpy(zero_copy_only=False)).astype(object)
        ids = pd.util.hash_array(array).view(np.int64)
    reserved = nulls | (ids == np.iinfo(np.int64).max)
    if reserved.any():
        ids = ids.copy()
        ids[reserved] = NULL_RAW_ID
    return ids


def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Writes via a temporary file and a rename, so concurrent builders (ranks) never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def content_fingerprints(
    schema: Schema, values: dict[str, pd.Index], buckets: dict[str, int], numeric: dict[str, tuple[float, float]]
) -> dict[str, str]:
    """What a trained model depends on, by part: ``schema``, ``numeric`` statistics, and each table's
    vocabulary in row order (or its bucket count; a raw-id table, the way its ids are made)."""
    out = {
        "schema": _digest(json.dumps(schema.to_dict(), sort_keys=True)),
        "numeric": _digest(json.dumps({k: [round(m, 12), round(s, 12)] for k, (m, s) in sorted(numeric.items())})),
    }
    for table, index in values.items():
        array = index.to_numpy()
        out[table] = (
            _digest(array.astype(np.int64).tobytes())
            if array.dtype.kind in "iu"
            else _digest("\0".join(map(str, array)))
        )
    for table, n in buckets.items():
        out[table] = _digest(f"hash buckets: {n}")
    for f in schema.tables:
        if f.raw:
            out[f.name] = _digest("raw ids: int64 as is; str and uint64: pandas hash_array")
    return out


def check_same_content(trained: dict | DatasetInfo, current: DatasetInfo, data_dir: str | Path) -> None:
    """Refuses ``current`` data whose content differs from what the model was ``trained`` on, naming
    the parts (a vocabulary rebuilt in another order maps every id to another row: scores would be
    garbage, printed as if right)."""
    trained = DatasetInfo.from_any(trained)
    if not trained.fingerprints:  # written before content fingerprints: table sizes are all there is
        sizes = {t: n for t, n in trained.num_embeddings.items() if current.num_embeddings.get(t) != n}
        if sizes:
            raise DataError(
                f"{data_dir}: table sizes differ from the checkpoint's {sizes}; use the dataset the model "
                f"was trained on"
            )
        if not _warned_old[0]:
            _warned_old[0] = True
            log.warning(
                "the checkpoint predates content fingerprints: only its table sizes were checked against %s", data_dir
            )
        return
    differ = [
        part
        for part in sorted(set(trained.fingerprints) | set(current.fingerprints))
        if trained.fingerprints.get(part) != current.fingerprints.get(part)
    ]
    if differ:
        named = ", ".join(
            "the schema" if p == "schema" else "numeric statistics" if p == "numeric" else f"the vocabulary of {p!r}"
            for p in differ
        )
        raise DataError(
            f"{data_dir}: its content differs from the data the model was trained on in {named} (a "
            f"vocabulary rebuilt in another order, new train rows, or another schema); evaluate on that "
            f"data or retrain"
        )


_warned_old = [False]


def _batches(reader, file: Path, columns: list[str]):  # noqa: ANN001, ANN202
    """The record batches of a train file; a corrupt page is a ``DataError`` naming file and row group."""
    for rg in range(reader.num_row_groups):
        try:
            yield from reader.iter_batches(batch_size=262_144, row_groups=[rg], columns=columns or None)
        except (pa.ArrowException, OSError) as err:
            raise DataError(
                f"{file}: row group {rg} is unreadable ({err}); `recsys data check` lists every such problem"
            ) from err


def vocabulary_files(data_dir: str | Path) -> list[Path]:
    """The files vocabularies (and train counts, item texts, numeric statistics) are built from: the
    train split, or for a dataset partitioned by day (``recsys.data.days``) its first day."""
    days = partitions(data_dir)
    plain = Path(data_dir) / "train"
    if days and not (plain.is_dir() and any(plain.glob("*.parquet"))):
        return split_files(data_dir, day_split(days[0]))
    return split_files(data_dir, "train")


def _fingerprint(schema: Schema, files: list[Path]) -> str:
    h = hashlib.sha256(json.dumps(schema.to_dict(), sort_keys=True).encode())
    for f in files:
        st = f.stat()
        name = f.name if f.parent.name == "train" else f"{f.parent.name}/{f.name}"  # a day's folder counts
        h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _index(values: np.ndarray) -> pd.Index:
    import pandas as pd

    # object dtype for strings: pandas' Arrow-backed string index converts itself on every lookup
    return pd.Index(values, dtype=object if values.dtype.kind not in "iu" else values.dtype)


def _values_numpy(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    nulls = values.is_null().to_numpy(zero_copy_only=False)
    if nulls.any():
        fill = 0 if pa.types.is_integer(values.type) else ""
        values = pc.fill_null(values, fill)
    return values.to_numpy(zero_copy_only=False), nulls


@dataclass
class DatasetInfo:
    """What a model needs to know about its dataset; stored in checkpoints as a plain dict."""

    path: str
    schema: dict
    num_embeddings: dict[str, int]  # table (owning feature) -> rows, OOV row included; 0: raw ids, no vocabulary
    fingerprint: str = ""  # of the content (all of fingerprints)
    fingerprints: dict[str, str] = field(default_factory=dict)  # part -> content fingerprint (check_same_content)

    @property
    def parsed_schema(self) -> Schema:
        return parse_schema(self.schema, source=f"{self.path}/schema.yaml")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_any(cls, value: DatasetInfo | dict) -> DatasetInfo:
        if isinstance(value, DatasetInfo):
            return value
        if not isinstance(value, dict) or not {"path", "schema", "num_embeddings"} <= set(value):
            raise ValueError("features must be the dataset info dict that CTRDataModule.dataset_info provides")
        return cls(**value)


@dataclass
class Vocabulary:
    """Id lookups and statistics of one dataset directory (see module docstring)."""

    data_dir: Path
    schema: Schema
    values: dict[str, pd.Index]  # vocabulary tables: known values, row i -> id i + 1
    counts: dict[str, np.ndarray]  # [num_embeddings] train occurrences per row (row 0 = OOV: 0), every table
    buckets: dict[str, int]  # hashed tables: number of buckets
    numeric_stats: dict[str, tuple[float, float]]  # name -> (mean, std) over train
    column_types: dict[str, str]  # id kind of each id column in train (drift check)
    fingerprint: str  # of the sources (schema + train files): when to rebuild
    fingerprints: dict[str, str] = field(default_factory=dict)  # of the content, by part

    # -- lookups ---------------------------------------------------------------------------
    def num_embeddings(self, table: str) -> int:
        """Rows of ``table``'s vocabulary (OOV row included); 0 for a ``vocabulary: none`` table."""
        if self.schema[table].raw:
            return 0
        if table in self.buckets:
            return self.buckets[table] + 1
        return len(self.values[table]) + 1

    def table_sizes(self) -> dict[str, int]:
        return {f.name: self.num_embeddings(f.name) for f in self.schema.tables}

    def lookup(self, table: str, values: pa.Array) -> np.ndarray:
        """Table rows (int64) for raw ids; unseen ids and nulls map to 0, the OOV row (a ``vocabulary: none``
        table: the ids themselves, see ``raw_ids``).

        Only the distinct values of ``values`` are looked up (a batch of sequences repeats
        the same few thousand items hundreds of thousands of times).
        """
        encoded = values if pa.types.is_dictionary(values.type) else pc.dictionary_encode(values)
        distinct = encoded.dictionary
        null = NULL_RAW_ID if self.schema[table].raw else 0
        rows = np.append(self._rows_of_distinct(table, distinct), null)  # last slot: null -> OOV (raw: NULL_RAW_ID)
        indices = pc.fill_null(encoded.indices, len(distinct)).to_numpy(zero_copy_only=False)
        return rows[indices]

    def _rows_of_distinct(self, table: str, distinct: pa.Array) -> np.ndarray:
        if self.schema[table].raw:
            return raw_ids(distinct)
        if table in self.buckets:
            return hash_bucket(distinct, self.buckets[table])
        array, nulls = _values_numpy(distinct)
        index = self.values[table]
        if index.dtype.kind in "iu" and array.dtype.kind not in "iu":
            return np.zeros(len(array), dtype=np.int64)  # type drift is caught by check_types
        ids = index.get_indexer(array).astype(np.int64) + 1
        ids[nulls] = 0
        return ids

    def group_ids(self, column: pa.Array) -> np.ndarray:
        if pa.types.is_integer(column.type):
            return pc.fill_null(column, -1).to_numpy(zero_copy_only=False).astype(np.int64)
        return hash_bucket(column, 2**62)

    def check_types(self, arrow_schema: pa.Schema, file: Path) -> None:
        """Stops on schema drift: an id column whose kind (int/str, scalar/list) differs from train's.

        Ints looked up in a string vocabulary (or the reverse) would all become OOV silently.
        """
        for column, train_kind in self.column_types.items():
            if column in arrow_schema.names and id_kind(arrow_schema.field(column).type) != train_kind:
                raise DataError(
                    f"{file}: column {column!r} has type {arrow_schema.field(column).type} "
                    f"({id_kind(arrow_schema.field(column).type)}) but "
                    f"{train_kind} ids in the train split (schema drift)"
                )

    def info(self) -> DatasetInfo:
        return DatasetInfo(
            path=str(self.data_dir),
            schema=self.schema.to_dict(),
            num_embeddings=self.table_sizes(),
            fingerprint=_digest(json.dumps(self.fingerprints, sort_keys=True)),
            fingerprints=dict(self.fingerprints),
        )

    # -- building and loading --------------------------------------------------------------
    @classmethod
    def load_or_build(cls, data_dir: str | Path, schema: Schema | None = None) -> Vocabulary:
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise DataError(f"{data_dir}: dataset directory not found")
        schema = schema or load_schema(data_dir)
        files = vocabulary_files(data_dir)
        fingerprint = _fingerprint(schema, files)
        meta_file = data_dir / "vocab" / "meta.json"
        if meta_file.exists():
            meta = json.loads(meta_file.read_text())
            if meta.get("fingerprint") == fingerprint and meta.get("format_version") == FORMAT_VERSION:
                return cls._load(data_dir, schema, meta)
            log.info("%s: train files or schema changed; rebuilding vocabularies", data_dir)
        return cls._build(data_dir, schema, files, fingerprint)

    @classmethod
    def load_saved(cls, directory: str | Path, schema: Schema) -> Vocabulary:
        """The vocabulary saved in ``directory/vocab`` as is, with no train files to check it against
        (an export directory)."""
        meta_file = Path(directory) / "vocab" / "meta.json"
        if not meta_file.exists():
            raise DataError(f"{meta_file}: vocabulary not found")
        meta = json.loads(meta_file.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{meta_file}: vocabulary format {meta.get('format_version')}, this recsys reads {FORMAT_VERSION}"
            )
        return cls._load(Path(directory), schema, meta)

    @classmethod
    def _load(cls, data_dir: Path, schema: Schema, meta: dict) -> Vocabulary:
        values, counts = {}, {}
        for name in meta["vocab_tables"]:
            file = data_dir / "vocab" / f"{name}.parquet"
            try:
                table = pq.read_table(file)
            except Exception as err:
                raise DataError(
                    f"{file}: cannot read vocabulary ({err}); delete {data_dir / 'vocab'} to rebuild"
                ) from err
            values[name] = _index(table.column("value").to_numpy(zero_copy_only=False))
            counts[name] = np.concatenate([[0], table.column("count").to_numpy()]).astype(np.int64)
        for name in meta["buckets"]:
            file = data_dir / "vocab" / f"{name}.buckets.parquet"
            counts[name] = pq.read_table(file).column("count").to_numpy().astype(np.int64)
        return cls(
            data_dir=data_dir,
            schema=schema,
            values=values,
            counts=counts,
            buckets={k: int(v) for k, v in meta["buckets"].items()},
            numeric_stats={k: (float(m), float(s)) for k, (m, s) in meta["numeric"].items()},
            column_types=meta["column_types"],
            fingerprint=meta["fingerprint"],
            fingerprints=content_fingerprints(
                schema,
                values,
                {k: int(v) for k, v in meta["buckets"].items()},
                {k: (float(m), float(s)) for k, (m, s) in meta["numeric"].items()},
            ),
        )

    @classmethod
    def _build(cls, data_dir: Path, schema: Schema, files: list[Path], fingerprint: str) -> Vocabulary:
        import pandas as pd

        owners = schema.tables
        hashed = {f.name: f.num_buckets for f in owners if f.num_buckets}
        counted = [f for f in owners if not f.num_buckets and not f.raw]  # raw ids: nothing to count
        partial: dict[str, list[pd.Series]] = {f.name: [] for f in counted}
        sums = {f.name: np.zeros(3) for f in schema.numeric}  # n, sum, sum of squares
        column_types: dict[str, str] = {}
        id_columns = [f.name for f in schema.features if f.type in ID_TYPES] + ([schema.group] if schema.group else [])
        rows = 0
        bucket_counts = {name: np.zeros(n + 1, dtype=np.int64) for name, n in hashed.items()}
        columns = [f.name for f in owners] + [f.name for f in schema.numeric]
        for file in tqdm(files, desc=f"vocab {data_dir.name}", unit="file", disable=len(files) < 4):
            reader = open_parquet(file)
            check_columns(schema, reader.schema_arrow, file)
            for c in id_columns:
                kind = id_kind(reader.schema_arrow.field(c).type)
                if column_types.setdefault(c, kind) != kind:
                    raise DataError(f"{file}: column {c!r} holds {kind} ids but {column_types[c]} in {files[0]}")
            file_rows = 0
            for batch in _batches(reader, file, columns):
                rows += batch.num_rows
                file_rows += batch.num_rows
                for f in counted:
                    flat, _ = flat_ids(batch.column(f.name))
                    vc = pc.value_counts(pc.drop_null(flat))
                    partial[f.name].append(
                        pd.Series(
                            vc.field("counts").to_numpy(), index=vc.field("values").to_numpy(zero_copy_only=False)
                        )
                    )
                for name, n in hashed.items():
                    flat, _ = flat_ids(batch.column(name))
                    bucket_counts[name] += np.bincount(hash_bucket(flat, n), minlength=n + 1)
                for f in schema.numeric:
                    x = pc.fill_null(batch.column(f.name).cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False)
                    finite = ~bad_numbers(x)
                    if not finite.all():
                        if f.missing == "error":
                            bad = int(np.flatnonzero(~finite)[0])
                            raise DataError(
                                f"{file}: column {f.name!r} row {file_rows - batch.num_rows + bad}: numeric value "
                                f"{float(x[bad])!r} is missing, non-finite or beyond float32's range (declare "
                                f"`missing: mean` or `missing: zero` in the schema to impute it)"
                            )
                        x = x[finite]  # statistics over the values present
                    sums[f.name] += (len(x), x.sum(), (x * x).sum())
        if rows == 0:
            raise DataError(f"{data_dir}: split 'train' is empty (0 rows)")

        out = data_dir / "vocab"
        out.mkdir(exist_ok=True)
        values, counts = {}, {}
        for f in counted:
            merged = pd.concat(partial[f.name]).groupby(level=0, sort=False).sum()
            frame = pd.DataFrame({"value": merged.index, "count": merged.to_numpy()})
            frame = frame[frame["count"] >= f.min_count]
            frame = frame.sort_values(["count", "value"], ascending=[False, True], kind="stable")
            _atomic(
                out / f"{f.name}.parquet",
                lambda tmp, frame=frame: pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp),
            )
            values[f.name] = _index(frame["value"].to_numpy())
            counts[f.name] = np.concatenate([[0], frame["count"].to_numpy()]).astype(np.int64)
        for name, row_counts in bucket_counts.items():
            row_counts[0] = 0  # nulls: the OOV row, like vocabulary tables
            _atomic(
                out / f"{name}.buckets.parquet", lambda tmp, c=row_counts: pq.write_table(pa.table({"count": c}), tmp)
            )
            counts[name] = row_counts
        numeric = {}
        for name, (n, total, squares) in sums.items():
            if n == 0:
                raise DataError(
                    f"{files[0].parent}: column {name!r} has no usable value in the train split, so "
                    f"`missing: {schema[name].missing}` has no mean to impute; fill the column, use "
                    f"`missing: zero`, or drop the feature"
                )
            mean = total / n
            std = float(np.sqrt(max(squares / n - mean * mean, 0.0)))
            if not (np.isfinite(mean) and np.isfinite(std)):
                raise DataError(
                    f"{files[0].parent}: column {name!r}: its train statistics overflow (mean {mean}, std "
                    f"{std}); rescale the column"
                )
            numeric[name] = (float(mean), std if std > 1e-12 else 1.0)
        fingerprints = content_fingerprints(schema, values, hashed, numeric)
        meta = {
            "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "content_fingerprints": fingerprints,
            "train_rows": rows,
            "vocab_tables": [f.name for f in counted],
            "buckets": hashed,
            "num_embeddings": {
                f.name: (0 if f.raw else hashed[f.name] + 1 if f.name in hashed else len(values[f.name]) + 1)
                for f in owners
            },
            "numeric": numeric,
            "column_types": column_types,
        }
        _atomic(out / "meta.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
        log.info("%s: built vocabularies %s from %d train rows", data_dir, meta["num_embeddings"], rows)
        return cls(data_dir, schema, values, counts, hashed, numeric, column_types, fingerprint, fingerprints)
