"""Parquet side of the contract: split files, column type checks, and the streaming dataset.

``ParquetStream`` reads record batches of a split with pyarrow (never the whole split),
encodes them into id/jagged numpy arrays with the dataset's vocabulary, optionally shuffles
through a bounded buffer, and yields ready ``Batch`` objects. Work is divided by Parquet row
group across ranks and dataloader workers, so every row is read by exactly one of them.

Example::

    stream = ParquetStream("data/ml100k-ctr", "train", vocab, batch_size=2048, shuffle=True)
    batch = next(iter(stream))        # Batch with sparse/sequences KJTs, dense [B, n_dense]
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from recsys.data.batch import Batch, jagged_take, make_kjt
from recsys.data.schema import FeatureSpec, FeatureType, Schema, SchemaError

if TYPE_CHECKING:
    from recsys.data.vocab import Vocabulary

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
POSITION_BITS = 40  # a row's position: file_index << 40 | row in file


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
        raise DataError(f"{data_dir}: split {split!r} has no Parquet files (looked for {folder}/*.parquet and {single})")
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
    if schema.group and arrow_schema.names.count(schema.group) == 1 and not _is_id_type(arrow_schema.field(schema.group).type):
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
    """"int", "str", "list<int>" or "list<str>": what decides how ids are looked up."""
    if _is_list(t):
        return f"list<{id_kind(t.value_type)}>"
    if pa.types.is_dictionary(t):
        t = t.value_type
    return "int" if pa.types.is_integer(t) else "str" if _is_id_type(t) else str(t)


def log_extra_columns(schema: Schema, arrow_schema: pa.Schema, file: Path) -> None:
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


def keep_most_recent(values: np.ndarray, lengths: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Truncates each jagged row to its last ``max_len`` items (the most recent are last)."""
    if len(lengths) == 0 or lengths.max(initial=0) <= max_len:
        return values, lengths
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    position = np.arange(len(values)) - starts
    keep = position >= np.repeat(lengths - max_len, lengths)
    return values[keep], np.minimum(lengths, max_len)


@dataclass
class Chunk:
    """Encoded rows: everything a ``Batch`` needs, as numpy arrays (jagged as values+lengths)."""

    labels: np.ndarray  # [N] float32
    groups: np.ndarray  # [N] int64
    dense: np.ndarray  # [N, n_dense] float32
    sparse: dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (values, lengths)
    sequences: dict[str, tuple[np.ndarray, np.ndarray]]
    positions: np.ndarray  # [N] int64: file_index << 40 | row in file
    text: dict[str, np.ndarray] = field(default_factory=dict)  # row-level text columns: name -> [N] str objects

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, rows: np.ndarray) -> Chunk:
        return Chunk(
            labels=self.labels[rows],
            groups=self.groups[rows],
            dense=self.dense[rows],
            sparse={k: jagged_take(v, ln, rows) for k, (v, ln) in self.sparse.items()},
            sequences={k: jagged_take(v, ln, rows) for k, (v, ln) in self.sequences.items()},
            positions=self.positions[rows],
            text={k: v[rows] for k, v in self.text.items()},
        )

    @staticmethod
    def concat(chunks: list[Chunk]) -> Chunk:
        if len(chunks) == 1:
            return chunks[0]

        def cat_jagged(key: str, attr: str) -> tuple[np.ndarray, np.ndarray]:
            parts = [getattr(c, attr)[key] for c in chunks]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

        first = chunks[0]
        return Chunk(
            labels=np.concatenate([c.labels for c in chunks]),
            groups=np.concatenate([c.groups for c in chunks]),
            dense=np.concatenate([c.dense for c in chunks]),
            sparse={k: cat_jagged(k, "sparse") for k in first.sparse},
            sequences={k: cat_jagged(k, "sequences") for k in first.sequences},
            positions=np.concatenate([c.positions for c in chunks]),
            text={k: np.concatenate([c.text[k] for c in chunks]) for k in first.text},
        )

    def to_batch(self) -> Batch:
        return Batch(
            dense=torch.from_numpy(self.dense),
            sparse=make_kjt(self.sparse),
            sequences=make_kjt(self.sequences),
            labels=torch.from_numpy(self.labels),
            groups=torch.from_numpy(self.groups),
            positions=torch.from_numpy(self.positions),
            text={k: v.tolist() for k, v in self.text.items()} or None,
        )


class ChunkEncoder:
    """Turns a pyarrow record batch into a validated ``Chunk`` using the dataset's vocabulary."""

    def __init__(self, schema: Schema, vocab: Vocabulary) -> None:
        self.schema = schema
        self.vocab = vocab

    def _ids(self, spec: FeatureSpec, column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        values, lengths = flat_ids(column)
        ids = self.vocab.lookup(spec.table, values)
        if spec.type is FeatureType.SEQUENCE:
            ids, lengths = keep_most_recent(ids, lengths, spec.max_len or 50)
        return ids, lengths

    def encode(self, batch: pa.RecordBatch, file: Path, first_row: int, file_index: int = 0) -> Chunk:
        schema = self.schema
        label_col = batch.column(schema.label)
        labels = label_col.to_numpy(zero_copy_only=False).astype(np.float32)
        bad = np.flatnonzero(~((labels == 0) | (labels == 1)))  # also catches NaN and nulls
        if len(bad):
            row = first_row + int(bad[0])
            raw = label_col[int(bad[0])].as_py()
            raise DataError(
                f"{file}: column {schema.label!r} row {row}: label must be 0 or 1, got {raw!r} "
                f"({len(bad)} bad row(s) in this batch)"
            )
        if schema.group:
            groups = self.vocab.group_ids(batch.column(schema.group))
        else:
            groups = np.zeros(len(labels), dtype=np.int64)

        dense_cols = []
        for spec in schema.numeric:
            column = batch.column(spec.name)
            x = pc.fill_null(column.cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False)
            bad = np.flatnonzero(bad_numbers(x))
            mean, std = self.vocab.numeric_stats[spec.name]
            if len(bad) and spec.missing == "error":
                raise DataError(
                    f"{file}: column {spec.name!r} row {first_row + int(bad[0])}: numeric value is "
                    f"{column[int(bad[0])].as_py()!r} ({len(bad)} missing, non-finite or beyond float32 in this "
                    f"batch); clean it, or declare `missing: mean` or `missing: zero` for it in the schema"
                )
            if len(bad):
                x = x.copy()
                x[bad] = mean if spec.missing == "mean" else 0.0
            dense_cols.append(((x - mean) / std).astype(np.float32))
        dense = np.stack(dense_cols, axis=1) if dense_cols else np.zeros((len(labels), 0), np.float32)

        sparse = {s.name: self._ids(s, batch.column(s.name)) for s in schema.sparse}
        sequences = {s.name: self._ids(s, batch.column(s.name)) for s in schema.sequences}
        positions = (np.int64(file_index) << np.int64(POSITION_BITS)) + np.arange(first_row, first_row + len(labels), dtype=np.int64)
        text = {s.name: pc.fill_null(batch.column(s.name), "").to_numpy(zero_copy_only=False).astype(object)
                for s in schema.row_text}
        return Chunk(labels, groups, dense, sparse, sequences, positions, text)


@dataclass(frozen=True)
class _Unit:
    """One row group of one file: the unit of work split across ranks and workers."""

    file: Path
    row_group: int
    first_row: int
    num_rows: int
    file_index: int = 0


class ParquetStream(IterableDataset):
    """Streams one split as ``Batch`` objects. Use with ``DataLoader(stream, batch_size=None)``.

    Args:
        data_dir: dataset directory (schema.yaml + splits).
        split: "train", "val" or "test".
        vocab: the dataset's ``Vocabulary`` (built from train).
        batch_size: rows per batch.
        shuffle: shuffle row-group order and rows within a ``shuffle_buffer``-row window.
        shuffle_buffer: rows held for shuffling (bounds memory).
        drop_last: drop the final partial batch of each worker.
        seed: base seed; the shuffle of epoch e uses ``seed + e`` (see ``set_epoch``).
        rank, world_size: this process's share of the row groups (defaults: torch.distributed).
        num_workers: dataloader workers that will read it (only for ``len()``).

    Row groups are dealt to the ``world_size * num_workers`` readers round-robin, the same way
    every epoch, so ``len()`` (batches per epoch on this rank) is exact; shuffling changes the
    order of a reader's row groups and of rows within its buffer.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        vocab: Vocabulary,
        batch_size: int = 1024,
        shuffle: bool = False,
        shuffle_buffer: int = 200_000,
        drop_last: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.data_dir = Path(data_dir)
        self.split = split
        self.vocab = vocab
        self.schema = vocab.schema
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.shuffle_buffer = max(shuffle_buffer, batch_size)
        self.drop_last = drop_last
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.num_workers = num_workers
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._resume = torch.tensor([-1, 0], dtype=torch.int64).share_memory_()  # (epoch, batches done)
        self.units, self.num_rows = self._plan()

    def _plan(self) -> tuple[list[_Unit], int]:
        units, total = [], 0
        for i, file in enumerate(split_files(self.data_dir, self.split)):
            meta = open_parquet(file)
            check_columns(self.schema, meta.schema_arrow, file)
            self.vocab.check_types(meta.schema_arrow, file)
            if i == 0:
                log_extra_columns(self.schema, meta.schema_arrow, file)
            first = 0
            for rg in range(meta.num_row_groups):
                n = meta.metadata.row_group(rg).num_rows
                if n:
                    units.append(_Unit(file, rg, first, n, i))
                first += n
            total += first
        if total == 0:
            raise DataError(f"{self.data_dir}: split {self.split!r} is empty (0 rows)")
        return units, total

    def set_epoch(self, epoch: int) -> None:
        """Changes the shuffle of the next pass; shared with worker processes."""
        self._epoch.fill_(epoch)

    def resume_from(self, epoch: int, batches: int) -> None:
        """The next pass continues epoch ``epoch`` after its first ``batches`` batches on this rank
        (over all workers, in the order a ``DataLoader`` interleaves them). The batches before are
        replayed without being assembled, so the rest is exactly what an uninterrupted pass yields."""
        if batches >= len(self):
            self._epoch.fill_(epoch + 1)
            self._resume.copy_(torch.tensor([-1, 0]))
        else:
            self._epoch.fill_(epoch)
            self._resume.copy_(torch.tensor([epoch, batches]))

    def _resume_plan(self, workers: int, world: int) -> tuple[int, list[int]]:
        """(rotation, batches each original worker has yielded) for a resumed pass.

        A ``DataLoader`` takes one batch from each worker in turn, in worker order, passing over
        workers that are done. After ``batches`` outputs the next turn is some worker ``r``; a
        new ``DataLoader`` starts its turns at worker 0, so resumed worker ``j`` plays original
        worker ``(j + r) mod workers`` and skips what that one had yielded.
        """
        epoch, batches = (int(x) for x in self._resume)
        taken = [0] * workers
        if epoch != int(self._epoch.item()) or batches <= 0:
            return 0, taken
        left = [self._cap(w, workers, world) for w in range(workers)]
        w = 0
        for _ in range(batches):
            while left[w] == 0:
                w = (w + 1) % workers
            taken[w] += 1
            left[w] -= 1
            w = (w + 1) % workers
        return w, taken

    def _rank_world(self) -> tuple[int, int]:
        if self.rank is not None and self.world_size is not None:
            return self.rank, self.world_size
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _units_of(self, reader: int, num_readers: int) -> list[_Unit]:
        return self.units[reader::num_readers]

    def _batches_of(self, reader: int, num_readers: int) -> int:
        rows = sum(u.num_rows for u in self._units_of(reader, num_readers))
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)

    def _cap(self, worker: int, workers: int, world: int) -> int:
        """Batches reader (·, worker) yields: the fewest any rank's same worker has, so that
        every rank runs the same number of steps (collectives in DDP/DMP must line up)."""
        return min(self._batches_of(r * workers + worker, world * workers) for r in range(world))

    def __len__(self) -> int:
        """Batches this rank yields per epoch, over all its dataloader workers."""
        _, world = self._rank_world()
        workers = max(1, self.num_workers)
        return sum(self._cap(worker, workers, world) for worker in range(workers))

    def _shard(self) -> tuple[list[_Unit], np.random.Generator, int, int]:
        rank, world = self._rank_world()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rotation, taken = self._resume_plan(workers, world)
        worker = (worker + rotation) % workers  # the original worker this one continues
        reader = rank * workers + worker
        units = self._units_of(reader, world * workers)
        rng = np.random.default_rng([self.seed, int(self._epoch.item()), reader])
        if self.shuffle:
            units = [units[i] for i in rng.permutation(len(units))]
        return units, rng, self._cap(worker, workers, world), taken[worker]

    def _chunks(self, units: list[_Unit]) -> Iterator[Chunk]:
        encoder = ChunkEncoder(self.schema, self.vocab)
        columns = self.schema.columns()
        readers: dict[Path, pq.ParquetFile] = {}  # one footer read per file, not per row group
        for unit in units:
            if unit.file not in readers:
                readers[unit.file] = open_parquet(unit.file)
            reader = readers[unit.file]
            first = unit.first_row
            try:
                batches = reader.iter_batches(batch_size=65_536, row_groups=[unit.row_group], columns=columns)
                for record_batch in batches:
                    yield encoder.encode(record_batch, unit.file, first, unit.file_index)
                    first += record_batch.num_rows
            except (pa.ArrowException, OSError) as err:
                raise DataError(f"{unit.file}: row group {unit.row_group} is unreadable: {err}") from err

    def __iter__(self) -> Iterator[Batch]:
        units, rng, cap, skip = self._shard()
        for count, make in enumerate(self._batches(units, rng)):
            if count == cap:
                return
            if count >= skip:  # a resumed pass replays the skipped batches without assembling them
                yield make()

    def _batches(self, units: list[_Unit], rng: np.random.Generator) -> Iterator[Callable[[], Batch]]:
        pending: list[Chunk] = []
        held = 0
        for chunk in self._chunks(units):
            pending.append(chunk)
            held += len(chunk)
            if held < (self.shuffle_buffer if self.shuffle else self.batch_size):
                continue
            rows = Chunk.concat(pending)
            if self.shuffle:
                rows = rows.take(rng.permutation(len(rows)))
                # emit all but half a buffer, so rows of the next row groups mix with these
                emit = (len(rows) - self.shuffle_buffer // 2) // self.batch_size * self.batch_size
            else:
                emit = len(rows) // self.batch_size * self.batch_size
            for start in range(0, emit, self.batch_size):
                yield partial(_assemble, rows, start, start + self.batch_size)
            rest = rows.take(np.arange(emit, len(rows)))
            pending, held = [rest], len(rest)
            del rows
            release_freed_memory()
        if pending:
            rows = Chunk.concat(pending)
            if self.shuffle:
                rows = rows.take(rng.permutation(len(rows)))
            for start in range(0, len(rows), self.batch_size):
                end = min(start + self.batch_size, len(rows))
                if end - start < self.batch_size and self.drop_last:
                    break
                yield partial(_assemble, rows, start, end)


def release_freed_memory() -> None:
    """Returns freed heap pages to the OS (glibc ``malloc_trim``; a no-op elsewhere). A stream
    allocates and frees hundreds of MB per shuffle buffer; without this, fragmentation makes a
    long epoch's resident memory creep up with the rows read."""
    global _TRIM
    if _TRIM is None:
        try:
            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


def _assemble(rows: Chunk, start: int, end: int) -> Batch:
    return rows.take(np.arange(start, end)).to_batch()


__all__ = [
    "SPLITS",
    "Chunk",
    "ChunkEncoder",
    "DataError",
    "ParquetStream",
    "SchemaError",
    "bad_numbers",
    "check_columns",
    "split_files",
]
