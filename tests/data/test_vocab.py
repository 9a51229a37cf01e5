import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys.data.vocab import Vocabulary, hash_bucket
from tests.conftest import write_dataset


def test_vocabulary_from_train_only_with_oov_row(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "d")
    train = pq.read_table(root / "train").to_pandas()
    vocab = Vocabulary.load_or_build(root)
    assert vocab.num_embeddings("item") == train["item"].nunique() + 1
    # most frequent train item gets row 1; ties broken by value
    counts = train["item"].value_counts()
    top = counts[counts == counts.max()].index.min()
    assert vocab.lookup("item", pa.array([top]))[0] == 1
    assert vocab.counts["item"][1] == counts.max() and vocab.counts["item"][0] == 0
    # an id never seen in train and a null map to the OOV row 0
    assert vocab.lookup("item", pa.array([123456, None], type=pa.int64())).tolist() == [0, 0]
    # tags (a list column) are counted over their flattened values
    assert vocab.num_embeddings("tags") == 6
    mean, std = vocab.numeric_stats["price"]
    assert mean == pytest.approx(train["price"].mean()) and std == pytest.approx(train["price"].std(ddof=0))


def test_vocab_files_are_saved_and_reused(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "d")
    first = Vocabulary.load_or_build(root)
    meta = json.loads((root / "vocab" / "meta.json").read_text())
    assert meta["num_embeddings"] == first.table_sizes()
    again = Vocabulary.load_or_build(root)
    assert again.fingerprint == first.fingerprint
    assert np.array_equal(again.values["item"], first.values["item"])


def test_vocab_rebuilds_when_train_changes(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "d")
    before = Vocabulary.load_or_build(root).num_embeddings("user")
    table = pq.read_table(root / "train" / "part-0.parquet")
    users = table.column("user").to_numpy().copy()
    users[:5] = [7001, 7002, 7003, 7004, 7005]
    pq.write_table(
        table.set_column(table.schema.get_field_index("user"), "user", pa.array(users)),
        root / "train" / "part-0.parquet",
    )
    assert Vocabulary.load_or_build(root).num_embeddings("user") >= before + 4


def test_min_count_sends_rare_ids_to_oov(tmp_path: Path) -> None:
    schema = "label: click\nfeatures:\n  - {name: item, type: categorical, min_count: 60}\n"
    root = write_dataset(tmp_path / "d", schema=schema)
    train = pq.read_table(root / "train").to_pandas()
    counts = train["item"].value_counts()
    vocab = Vocabulary.load_or_build(root)
    assert vocab.num_embeddings("item") == int((counts >= 60).sum()) + 1
    rare = counts[counts < 60].index[0]
    assert vocab.lookup("item", pa.array([rare]))[0] == 0


def test_hash_bucket_is_stable_and_in_range() -> None:
    strings = hash_bucket(pa.array(["paris", "lyon", None, "paris"]), 7)
    assert strings[2] == 0 and strings[0] == strings[3]
    assert ((strings[[0, 1, 3]] >= 1) & (strings[[0, 1, 3]] <= 7)).all()
    # pinned values: the hash must not change across processes, platforms or releases
    assert hash_bucket(pa.array(["paris", "lyon"]), 1000).tolist() == PINNED_STRINGS
    assert hash_bucket(pa.array([0, 1, 2**40], type=pa.int64()), 1000).tolist() == PINNED_INTS


PINNED_STRINGS = [976, 865]
PINNED_INTS = [1, 790, 569]
