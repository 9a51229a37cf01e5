"""Encoding: a pyarrow record batch of one split → a validated ``Chunk`` of numpy arrays → a ``Batch``.

Ids go through the dataset's vocabulary, sequences keep their most recent ``max_len`` items, and
every row carries its position (``file_index << POSITION_BITS | row in file``) for exact resume and
for naming rows in errors. Serving and retrieval use the encoder without the stream.

Example::

    encoder = ChunkEncoder(schema, vocab)
    chunk = encoder.encode(record_batch, file, first_row=0)
    batch = chunk.to_batch()            # Batch with sparse/sequences KJTs, dense [B, n_dense]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from recsys.data.arrow import DataError, bad_numbers, flat_ids
from recsys.data.batch import Batch, jagged_take, make_kjt
from recsys.data.schema import FeatureSpec, FeatureType, Schema

if TYPE_CHECKING:
    from recsys.data.vocab import Vocabulary

POSITION_BITS = 40  # a row's position: file_index << 40 | row in file


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
    # jagged offsets [N + 1] per column ("sparse.<name>", "sequences.<name>"), filled by ``rows`` on first use
    _offsets: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self, start: int, end: int) -> Chunk:
        """Rows ``[start, end)``: ``take(np.arange(start, end))`` by slicing (copies, so a batch never
        shares memory with the chunk it came from)."""

        def cut(key: str, values: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            if key not in self._offsets:
                self._offsets[key] = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
            offsets = self._offsets[key]
            return values[offsets[start] : offsets[end]].copy(), lengths[start:end].copy()

        return Chunk(
            labels=self.labels[start:end].copy(),
            groups=self.groups[start:end].copy(),
            dense=self.dense[start:end].copy(),
            sparse={k: cut(f"sparse.{k}", v, ln) for k, (v, ln) in self.sparse.items()},
            sequences={k: cut(f"sequences.{k}", v, ln) for k, (v, ln) in self.sequences.items()},
            positions=self.positions[start:end].copy(),
            text={k: v[start:end].copy() for k, v in self.text.items()},
        )

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
        positions = (np.int64(file_index) << np.int64(POSITION_BITS)) + np.arange(
            first_row, first_row + len(labels), dtype=np.int64
        )
        text = {
            s.name: pc.fill_null(batch.column(s.name), "").to_numpy(zero_copy_only=False).astype(object)
            for s in schema.row_text
        }
        return Chunk(labels, groups, dense, sparse, sequences, positions, text)
