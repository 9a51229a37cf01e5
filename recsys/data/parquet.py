"""The streaming dataset: one split of Parquet files as ready ``Batch`` objects.

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
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from recsys.data.arrow import DataError, check_columns, log_extra_columns, open_parquet, split_files
from recsys.data.batch import Batch
from recsys.data.encode import Chunk, ChunkEncoder

if TYPE_CHECKING:
    from recsys.data.vocab import Vocabulary

log = logging.getLogger(__name__)


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
        share: ``(rank, world)`` for an evaluation split scored in equal shares: every rank reads
            every batch (so all run the same number of steps) and keeps rows
            ``[rank·s, (rank+1)·s)`` of it, ``s = ceil(B / world)``, padded to ``s`` rows with
            repeats of the batch's first row (``Batch.padded``). Needs ``rank=0, world_size=1``.
        keep_encoded: keep a shuffling reader's rows encoded between passes when they fit one shuffle
            buffer (below); off for a split read once (a day of a day-by-day run).

    Row groups are dealt to the ``world_size * num_workers`` readers round-robin, the same way
    every epoch, so ``len()`` (batches per epoch on this rank) is exact; shuffling changes the
    order of a reader's row groups and of rows within its buffer. A shuffling reader whose row groups
    fit in one ``shuffle_buffer`` (held in memory whole during a pass anyway) keeps them encoded for
    its later passes instead of reading and encoding them again.
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
        share: tuple[int, int] | None = None,
        keep_encoded: bool = True,
    ) -> None:
        super().__init__()
        if share is not None and not (0 <= share[0] < share[1]):
            raise ValueError(f"share must be (rank, world) with 0 <= rank < world, got {share}")
        if share is not None and (rank, world_size) != (0, 1):
            raise ValueError(f"share={share} splits every batch: read the whole split (rank=0, world_size=1)")
        self.share = share if share is not None and share[1] > 1 else None
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
        self.keep_encoded = keep_encoded
        self._encoded: dict[tuple[Path, int], list[Chunk]] = {}  # see _chunks
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
        # a shuffled pass over rows that fit in one shuffle buffer holds them in memory whole anyway: keep
        # them encoded for the next epochs instead of reading and encoding them again (an evaluation
        # stream holds one batch at a time: it keeps nothing)
        keep = self.keep_encoded and self.shuffle and sum(u.num_rows for u in units) <= self.shuffle_buffer
        for unit in units:
            if keep and (unit.file, unit.row_group) in self._encoded:
                yield from self._encoded[unit.file, unit.row_group]
                continue
            encoded: list[Chunk] = []
            if unit.file not in readers:
                readers[unit.file] = open_parquet(unit.file)
            reader = readers[unit.file]
            first = unit.first_row
            try:
                batches = reader.iter_batches(batch_size=65_536, row_groups=[unit.row_group], columns=columns)
                for record_batch in batches:
                    encoded.append(encoder.encode(record_batch, unit.file, first, unit.file_index))
                    yield encoded[-1]
                    first += record_batch.num_rows
            except (pa.ArrowException, OSError) as err:
                raise DataError(f"{unit.file}: row group {unit.row_group} is unreadable: {err}") from err
            if keep:
                self._encoded[unit.file, unit.row_group] = encoded

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
                yield partial(_assemble, rows, start, start + self.batch_size, self.share)
            rest = rows.rows(emit, len(rows))
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
                yield partial(_assemble, rows, start, end, self.share)


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


def _assemble(rows: Chunk, start: int, end: int, share: tuple[int, int] | None = None) -> Batch:
    """Rows ``[start, end)`` as a Batch, or this rank's padded share of them (see ``share``)."""
    if share is None:
        return rows.rows(start, end).to_batch()
    rank, world = share
    size = -(-(end - start) // world)
    low = min(start + rank * size, end)
    index = np.arange(low, min(low + size, end))
    padded = size - len(index)
    batch = rows.take(np.concatenate([index, np.full(padded, start)])).to_batch()
    batch.shares, batch.padded = world, padded
    return batch
