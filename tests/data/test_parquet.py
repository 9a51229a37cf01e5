import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from recsys.data.arrow import DataError
from recsys.data.batch import jagged_take
from recsys.data.encode import keep_most_recent
from recsys.data.parquet import ParquetStream
from recsys.data.vocab import Vocabulary
from tests.conftest import TINY_SCHEMA, write_dataset

ROW_SCHEMA = TINY_SCHEMA.replace("group: user", "group: row_id")


def _stream(root: Path, split: str = "train", **kwargs) -> ParquetStream:
    return ParquetStream(root, split, Vocabulary.load_or_build(root), **kwargs)


def test_batch_matches_a_plain_reference(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "d", schema=ROW_SCHEMA)
    vocab = Vocabulary.load_or_build(root)
    frame = pq.read_table(root / "val").to_pandas()
    batch = next(iter(ParquetStream(root, "val", vocab, batch_size=50)))
    rows = frame.iloc[:50]
    assert batch.labels.tolist() == rows["click"].astype(float).tolist()
    assert batch.groups.tolist() == rows["row_id"].tolist()
    item_ids = {v: i + 1 for i, v in enumerate(vocab.values["item"])}
    assert batch.sparse["item"].values().tolist() == [item_ids.get(v, 0) for v in rows["item"]]
    # sequences: jagged, truncated to the most recent max_len=4, most recent last
    expected_hist = [[item_ids.get(v, 0) for v in list(h)[-4:]] for h in rows["hist_item"]]
    hist = batch.sequences["hist_item"]
    assert hist.lengths().tolist() == [len(h) for h in expected_hist]
    assert hist.values().tolist() == [v for h in expected_hist for v in h]
    assert batch.sparse["tags"].lengths().tolist() == [len(t) for t in rows["tags"]]
    mean, std = vocab.numeric_stats["price"]
    assert torch.allclose(
        batch.dense[:, 0], torch.tensor(((rows["price"] - mean) / std).to_numpy(), dtype=torch.float32)
    )
    assert batch.sparse.stride() == 50 and batch.sequences.stride() == 50


def test_keep_most_recent_against_reference() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 9, 100)
    values = np.arange(lengths.sum())
    got_values, got_lengths = keep_most_recent(values, lengths, 3)
    starts = np.cumsum(lengths) - lengths
    expected = [values[s : s + n][-3:] for s, n in zip(starts, lengths, strict=True)]
    assert got_lengths.tolist() == [len(e) for e in expected]
    assert got_values.tolist() == [v for e in expected for v in e]


def test_jagged_take_against_reference() -> None:
    lengths = np.array([2, 0, 3, 1])
    values = np.array([10, 11, 20, 21, 22, 30])
    taken, taken_lengths = jagged_take(values, lengths, np.array([3, 0, 1, 2]))
    assert taken.tolist() == [30, 10, 11, 20, 21, 22] and taken_lengths.tolist() == [1, 2, 0, 3]


def test_rows_of_a_chunk_are_a_copy_of_the_plain_take(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "d", schema=ROW_SCHEMA)
    chunk = next(_stream(root, "val")._chunks(_stream(root, "val").units))
    for start, end in [(0, 5), (7, 7), (3, len(chunk)), (len(chunk) - 1, len(chunk))]:
        got, expected = chunk.rows(start, end), chunk.take(np.arange(start, end))
        assert got.labels.tolist() == expected.labels.tolist() and got.positions.tolist() == expected.positions.tolist()
        assert np.array_equal(got.dense, expected.dense)
        for part in ("sparse", "sequences"):
            for key, (values, lengths) in getattr(expected, part).items():
                assert getattr(got, part)[key][0].tolist() == values.tolist(), (part, key)
                assert getattr(got, part)[key][1].tolist() == lengths.tolist(), (part, key)
    got = chunk.rows(0, 5)
    got.sequences["hist_item"][0][:] = -1  # a batch never writes into the rows it was cut from
    got.labels[:] = -1
    assert (chunk.sequences["hist_item"][0] >= 0).all() and (chunk.labels >= 0).all()


@pytest.mark.parametrize(
    ("buffer", "keep", "shuffle"), [(4000, True, True), (1000, True, True), (4000, False, True), (4000, True, False)]
)
def test_a_split_that_fits_the_buffer_is_read_once(
    tmp_path: Path, buffer: int, keep: bool, shuffle: bool, monkeypatch
) -> None:
    """3,000 training rows: with a 4,000-row buffer the second epoch re-reads nothing and yields what a
    fresh stream yields; with 1,000, with keep_encoded off (a day of a day-by-day run) or without
    shuffling (an evaluation stream holds one batch at a time) every pass reads the files again."""
    root = write_dataset(tmp_path / "d", schema=ROW_SCHEMA)
    options = {"batch_size": 256, "shuffle": shuffle, "seed": 3, "shuffle_buffer": buffer}
    stream = _stream(root, **options, keep_encoded=keep)
    reads = []
    original = pq.ParquetFile.iter_batches

    def counted(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        reads.append(kwargs.get("row_groups"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counted)
    list(stream)
    first_pass = len(reads)
    assert first_pass == len(stream.units)
    stream.set_epoch(1)
    kept = [(b.groups.tolist(), b.sequences["hist_item"].values().tolist(), b.dense.tolist()) for b in stream]
    assert len(reads) == (first_pass if buffer == 4000 and keep and shuffle else 2 * first_pass)
    fresh = _stream(root, **options)
    fresh.set_epoch(1)
    assert kept == [(b.groups.tolist(), b.sequences["hist_item"].values().tolist(), b.dense.tolist()) for b in fresh]
    assert sorted(g for groups, _, _ in kept for g in groups) == sorted(range(3000))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_row_exactly_once_with_workers(tmp_path: Path, num_workers: int) -> None:
    root = write_dataset(
        tmp_path / "d", rows={"train": 2500, "val": 10, "test": 10}, schema=ROW_SCHEMA, row_group_size=300
    )
    stream = ParquetStream(
        root,
        "train",
        Vocabulary.load_or_build(root),
        batch_size=128,
        shuffle=True,
        shuffle_buffer=500,
        rank=0,
        world_size=1,
        num_workers=num_workers,
    )
    batches = list(DataLoader(stream, batch_size=None, num_workers=num_workers))
    assert len(batches) == len(stream)  # __len__ is exact
    assert torch.cat([b.groups for b in batches]).sort().values.tolist() == list(range(2500))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_read_disjoint_rows_in_equal_steps(tmp_path: Path, num_workers: int) -> None:
    root = write_dataset(
        tmp_path / "d", rows={"train": 2500, "val": 10, "test": 10}, schema=ROW_SCHEMA, row_group_size=300
    )
    vocab = Vocabulary.load_or_build(root)
    seen, steps = [], []
    for rank in range(2):
        stream = ParquetStream(
            root,
            "train",
            vocab,
            batch_size=128,
            shuffle=True,
            shuffle_buffer=500,
            rank=rank,
            world_size=2,
            num_workers=num_workers,
        )
        batches = list(DataLoader(stream, batch_size=None, num_workers=num_workers))
        assert len(batches) == len(stream)
        steps.append(len(batches))
        seen.append(torch.cat([b.groups for b in batches]))
    assert steps[0] == steps[1]  # collectives of DDP/DMP line up
    rows = torch.cat(seen)
    assert len(set(rows.tolist())) == len(rows)  # no row read twice
    assert set(seen[0].tolist()).isdisjoint(seen[1].tolist())
    # at most the surplus of the bigger shard is left out, never more than a few batches
    assert 2500 - len(rows) < 128 * 2 * max(1, num_workers) + 300


@pytest.mark.parametrize(("world", "num_workers"), [(2, 0), (3, 2)])
def test_evaluation_shares_cover_every_row_once_in_equal_steps(tmp_path: Path, world: int, num_workers: int) -> None:
    """Each rank scores ceil(B / world) rows of every batch (the last rank's share padded), so all run
    the same steps; the real rows of the shares, rank after rank, are the whole batch (a loop checks)."""
    root = write_dataset(tmp_path / "d", rows={"train": 300, "val": 1000, "test": 10}, schema=ROW_SCHEMA)
    vocab = Vocabulary.load_or_build(root)

    def batches(**share) -> list:  # noqa: ANN003
        stream = ParquetStream(
            root, "val", vocab, batch_size=99, rank=0, world_size=1, num_workers=num_workers, **share
        )
        return list(DataLoader(stream, batch_size=None, num_workers=num_workers))

    whole = batches()
    shares = [batches(share=(rank, world)) for rank in range(world)]
    assert {len(s) for s in shares} == {len(whole)}  # every rank: one step per batch of the split
    scored = 0
    for i, batch in enumerate(whole):
        size = -(-len(batch) // world)
        rows = []
        for rank in range(world):
            part = shares[rank][i]
            assert len(part) == size and part.shares == world  # equal shares: the sharded forward lines up
            real = len(part) - part.padded
            rows += part.positions[:real].tolist()  # positions: unique per row of the split
            assert part.positions[real:].tolist() == [batch.positions[0].item()] * part.padded
        assert rows == batch.positions.tolist()
        scored += len(rows)
    assert scored == 1000
    padding = sum(b.padded for s in shares for b in s)
    assert padding == sum(-(-len(b) // world) * world - len(b) for b in whole) > 0
    with pytest.raises(ValueError, match="share must be"):
        ParquetStream(root, "val", vocab, rank=0, world_size=1, share=(2, 2))
    with pytest.raises(ValueError, match="read the whole split"):  # split by row groups and again by rows
        ParquetStream(root, "val", vocab, rank=1, world_size=2, share=(1, 2))


def test_shuffle_changes_with_epoch_and_is_seeded(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "d", schema=ROW_SCHEMA)
    stream = _stream(root, batch_size=3000, shuffle=True, seed=1)
    first = next(iter(stream)).groups
    assert torch.equal(first, next(iter(stream)).groups)  # same epoch, same order
    stream.set_epoch(1)
    second = next(iter(stream)).groups
    assert not torch.equal(first, second) and sorted(first.tolist()) == sorted(second.tolist())
    assert first.tolist() != sorted(first.tolist())


def test_unseen_ids_become_oov_and_stay_in_range(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "d")
    vocab = Vocabulary.load_or_build(root)
    table = pq.read_table(root / "test" / "part-0.parquet")
    items = table.column("item").to_numpy().copy()
    items[:10] = 10_000 + np.arange(10)  # never seen in train
    pq.write_table(
        table.set_column(table.schema.get_field_index("item"), "item", pa.array(items)),
        root / "test" / "part-0.parquet",
    )
    batch = next(iter(ParquetStream(root, "test", vocab, batch_size=64)))
    assert batch.sparse["item"].values()[:10].tolist() == [0] * 10
    for key, rows in vocab.table_sizes().items():
        assert int(batch.sparse[key].values().max()) < rows


def _rewrite(root: Path, split: str, change) -> Path:
    file = root / split / "part-0.parquet"
    pq.write_table(change(pq.read_table(file)), file)
    return file


def _first_batch(root: Path, split: str = "val"):
    return next(iter(_stream(root, split, batch_size=10_000)))


def test_missing_column_names_file_and_column(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "d")
    file = _rewrite(root, "val", lambda t: t.drop(["price"]))
    with pytest.raises(DataError, match=rf"{file}: missing column\(s\) \['price'\]"):
        _first_batch(root)


def test_wrong_dtype_names_the_column(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "d")
    file = _rewrite(
        root, "val", lambda t: t.set_column(t.schema.get_field_index("price"), "price", pa.array(["x"] * len(t)))
    )
    with pytest.raises(DataError, match=rf"{file}: column 'price' has type string, expected a number"):
        _first_batch(root)


def test_list_where_a_scalar_belongs(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "d")
    _rewrite(root, "train", lambda t: t.set_column(t.schema.get_field_index("user"), "user", pa.array([[1]] * len(t))))
    with pytest.raises(DataError, match="column 'user' has type list<element: int64>, expected an integer or string"):
        Vocabulary.load_or_build(root)


def test_schema_drift_between_splits(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "d")
    file = _rewrite(
        root,
        "val",
        lambda t: t.set_column(
            t.schema.get_field_index("item"), "item", pa.array([str(v) for v in t.column("item").to_pylist()])
        ),
    )
    with pytest.raises(
        DataError, match=rf"{file}: column 'item' has type string \(str\) but int ids in the train split"
    ):
        _first_batch(root)


@pytest.mark.parametrize("bad", [2, float("nan")])
def test_bad_label_names_file_column_and_row(tmp_path: Path, bad: float) -> None:
    root = write_dataset(tmp_path / "d")

    def corrupt(t: pa.Table) -> pa.Table:
        labels = t.column("click").to_numpy().astype(float)
        labels[17] = bad
        return t.set_column(t.schema.get_field_index("click"), "click", pa.array(labels))

    file = _rewrite(root, "val", corrupt)
    with pytest.raises(DataError, match=rf"{file}: column 'click' row 17: label must be 0 or 1"):
        _first_batch(root)


def test_nan_numeric_is_rejected_with_row(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "d")

    def corrupt(t: pa.Table) -> pa.Table:
        price = t.column("price").to_numpy().copy()
        price[5] = np.nan
        return t.set_column(t.schema.get_field_index("price"), "price", pa.array(price))

    file = _rewrite(root, "val", corrupt)
    with pytest.raises(DataError, match=rf"{file}: column 'price' row 5"):
        _first_batch(root)


def test_empty_split_and_missing_split(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "d")
    _rewrite(root, "val", lambda t: t.slice(0, 0))
    with pytest.raises(DataError, match="split 'val' is empty"):
        _stream(root, "val")
    (root / "test" / "part-0.parquet").unlink()
    with pytest.raises(DataError, match="split 'test' has no Parquet files"):
        _stream(root, "test")


def test_corrupt_parquet_file_is_named(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "d")
    Vocabulary.load_or_build(root)
    file = root / "val" / "part-0.parquet"
    file.write_bytes(file.read_bytes()[:200])
    with pytest.raises(DataError, match=rf"{file}: cannot read as Parquet"):
        _stream(root, "val")


def test_extra_columns_are_logged_and_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = write_dataset(tmp_path / "d")
    with caplog.at_level(logging.INFO):
        _stream(root, "val")
    assert caplog.text.count("ignoring column(s) not in the schema: ['row_id']") == 1


def test_single_file_split_layout(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "d")
    (root / "val" / "part-0.parquet").rename(root / "val.parquet")
    (root / "val").rmdir()
    assert len(_first_batch(root)) == 600
