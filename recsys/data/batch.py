"""``Batch``: what every model receives.

Example::

    batch = Batch(dense=torch.zeros(2, 1), sparse=make_kjt({"user_id": (np.array([3, 7]), np.array([1, 1]))}),
                  sequences=make_kjt({}), labels=torch.tensor([0.0, 1.0]), groups=torch.tensor([3, 7]))
    batch = batch.to("cuda", non_blocking=True)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def jagged_take(values: np.ndarray, lengths: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Selects ``rows`` of a jagged array given as flat values + per-row lengths."""
    take_lengths = lengths[rows]
    if len(values) == 0 or take_lengths.sum() == 0:
        return values[:0], take_lengths
    starts = np.cumsum(lengths) - lengths
    out_starts = np.cumsum(take_lengths) - take_lengths
    index = np.repeat(starts[rows] - out_starts, take_lengths) + np.arange(take_lengths.sum())
    return values[index], take_lengths


def jagged_rows(lengths: torch.Tensor, num_values: int) -> torch.Tensor:
    """Row index of every jagged value: ``[0]*lengths[0] + [1]*lengths[1] + ...`` → ``[N]`` (the segment
    ids of pooling, attention and padding)."""
    rows = torch.arange(lengths.numel(), device=lengths.device)
    return torch.repeat_interleave(rows, lengths.long(), output_size=num_values)


def make_kjt(features: dict[str, tuple[np.ndarray, np.ndarray]]) -> KeyedJaggedTensor:
    """A KeyedJaggedTensor from ``{key: (values, lengths)}`` (lengths are per row, same row count)."""
    keys = list(features)
    if not keys:
        return KeyedJaggedTensor.empty()
    values = torch.from_numpy(np.concatenate([features[k][0] for k in keys]).astype(np.int64, copy=False))
    lengths = torch.from_numpy(np.concatenate([features[k][1] for k in keys]).astype(np.int32, copy=False))
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths)


@dataclass
class Batch:
    """One mini-batch of B rows.

    Attributes:
        dense: ``[B, n_dense]`` standardized numeric features.
        sparse: categorical and categorical_list ids, one key per feature, ``stride() == B``.
        sequences: behavior-sequence ids, jagged (no padding), most recent last.
        labels: ``[B]`` float 0/1.
        groups: ``[B]`` int64 group ids (users) for GAUC.
        text: row-level text columns (schema ``text`` features without ``item:``), ``{name: [B] strings}``;
            None when the schema has none. Item text does not travel here: it belongs to the item's table row.
        positions: ``[B]`` int64 row positions in the split, ``file_index · 2**40 + row_in_file``
            (which rows a step trained on: ``recsys.train.callbacks.RowLedger``).
        shares: how many ranks split the evaluation batch this one is a share of (1: not split).
        padded: trailing rows that repeat a real row only so that every rank's share has the same
            size (sharded forwards are collective); they are scored but never counted.
    """

    dense: torch.Tensor
    sparse: KeyedJaggedTensor
    sequences: KeyedJaggedTensor
    labels: torch.Tensor
    groups: torch.Tensor
    text: dict[str, list[str]] | None = None
    positions: torch.Tensor | None = None
    shares: int = 1
    padded: int = 0

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def all_ids(self) -> KeyedJaggedTensor:
        """Pooled id features and behavior sequences in one KJT (sparse keys first)."""
        if not self.sequences.keys():
            return self.sparse
        return KeyedJaggedTensor.concat([self.sparse, self.sequences])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return replace(
            self,
            dense=self.dense.to(device, non_blocking=non_blocking),
            sparse=self.sparse.to(device, non_blocking=non_blocking),
            sequences=self.sequences.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            groups=self.groups.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> Batch:
        return replace(
            self,
            dense=self.dense.pin_memory(),
            sparse=self.sparse.pin_memory(),
            sequences=self.sequences.pin_memory(),
            labels=self.labels.pin_memory(),
            groups=self.groups.pin_memory(),
        )

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        for t in (self.dense, self.labels, self.groups):
            t.record_stream(stream)
        self.sparse.record_stream(stream)
        self.sequences.record_stream(stream)
