"""The ml100k-ctr protocol (docs/protocols.md) reproduced exactly."""

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from recsys.data.schema import load_schema
from tests.conftest import ROOT


def _prepare_module():
    spec = importlib.util.spec_from_file_location("ml_prepare", ROOT / "datasets/movielens/prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def splits(ml100k: Path) -> dict[str, pd.DataFrame]:
    return {s: pq.read_table(ml100k / s).to_pandas() for s in ("train", "val", "test")}


def test_row_counts_and_positive_rates(splits) -> None:
    assert {s: len(f) for s, f in splits.items()} == {"train": 79_122, "val": 10_439, "test": 10_439}
    rates = {s: round(f["label"].mean(), 3) for s, f in splits.items()}
    assert rates == {"train": 0.573, "val": 0.486, "test": 0.477}


def test_per_user_split_sizes_follow_ceil_rule(splits) -> None:
    sizes = {s: f.groupby("user_id").size() for s, f in splits.items()}
    n = sizes["train"].add(sizes["val"], fill_value=0).add(sizes["test"], fill_value=0)
    k = np.ceil(0.1 * n).astype(int)
    assert (sizes["test"].reindex(n.index, fill_value=0) == k).all()
    assert (sizes["val"].reindex(n.index, fill_value=0) == k).all()


def test_history_is_the_previous_items_most_recent_last(splits) -> None:
    rows = pd.concat(splits.values()).sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    for user in (1, 2, 500, 943):
        seq = rows[rows["user_id"] == user]
        items = seq["item_id"].tolist()
        for i, hist in enumerate(seq["hist_item_id"]):
            assert list(hist) == items[max(0, i - 50) : i]
        assert len(seq["hist_item_id"].iloc[0]) == 0
    assert rows["hist_item_id"].map(len).max() == 50
    # val/test rows come after every train row of the same user
    last_train = splits["train"].groupby("user_id")["timestamp"].max()
    first_test = splits["test"].groupby("user_id")["timestamp"].min()
    assert (first_test >= last_train.reindex(first_test.index)).all()


def test_genre_sequence_runs_beside_items(splits) -> None:
    frame = splits["val"]
    genre_of = dict(zip(splits["train"]["item_id"], splits["train"]["genre"], strict=False))
    row = frame.iloc[123]
    known = [(i, g) for i, g in zip(row["hist_item_id"], row["hist_genre"], strict=True) if i in genre_of]
    assert known and all(genre_of[i] == g for i, g in known)


def test_schema_is_the_contract(ml100k: Path) -> None:
    schema = load_schema(ml100k)
    assert schema.label == "label" and schema.group == "user_id"
    assert schema["hist_item_id"].target == "item_id" and schema["hist_genre"].target == "genre"
    assert [f.name for f in schema.text] == ["movie_title"]


def test_grouplens_original_format_gives_the_same_rows(tmp_path: Path, splits) -> None:
    """A user-given directory in GroupLens' u.data/u.item/u.user format goes through the same protocol."""
    prepare = _prepare_module()
    frames = prepare.read_wheel(ROOT / "data" / "raw")
    inter, item, user = frames["inter"], frames["item"], frames["user"]
    inter.to_csv(tmp_path / "u.data", sep="\t", header=False, index=False)
    flags = pd.DataFrame({g: item["class"].str.split().map(lambda c, g=g: int(g in c)) for g in prepare.GENRES})
    original = pd.concat(
        [
            item["item_id"],
            item["movie_title"] + " (" + item["release_year"] + ")",
            "01-Jan-" + item["release_year"],
            pd.Series([""] * len(item)),
            pd.Series([""] * len(item)),
            flags,
        ],
        axis=1,
    )
    original.to_csv(tmp_path / "u.item", sep="|", header=False, index=False)
    user.to_csv(tmp_path / "u.user", sep="|", header=False, index=False)
    rebuilt = prepare.build(prepare.read_directory(tmp_path))
    assert {s: len(f) for s, f in rebuilt.items()} == {s: len(f) for s, f in splits.items()}
    assert rebuilt["test"]["label"].tolist() == splits["test"]["label"].tolist()
    assert rebuilt["test"]["genre"].tolist() == splits["test"]["genre"].tolist()


def test_missing_source_files_are_named(tmp_path: Path) -> None:
    prepare = _prepare_module()
    with pytest.raises(prepare.PrepareError, match="u.data"):
        prepare.read_directory(tmp_path)


def test_cold_items_lose_their_train_rows_and_leave_train_histories(tmp_path: Path, splits) -> None:
    """ml100k-cold against the ml100k-ctr splits, by a per-row loop: the same rows minus the cold items'."""
    import json

    prepare = _prepare_module()
    out = tmp_path / "cold"
    argv = ["--out", str(out), "--cache", str(ROOT / "data" / "raw"), "--cold-items", "0.2"]
    assert prepare.main(argv) == 0
    prepared = json.loads((out / "PREPARED.json").read_text())
    cold = set(prepared["cold"]["ids"])
    catalogue = pq.read_table(out / "items.parquet").to_pandas()
    assert prepared["protocol"] == "ml100k-cold/1" and len(catalogue) == catalogue["item_id"].nunique() == 1682
    assert len(cold) == round(0.2 * 1682) and cold <= set(catalogue["item_id"])
    got = {s: pq.read_table(out / s).to_pandas() for s in ("train", "val", "test")}
    expected_rows = []
    for _, row in splits["train"].iterrows():  # the warm train rows, their histories without cold items
        if row["item_id"] in cold:
            continue
        pairs = [(i, g) for i, g in zip(row["hist_item_id"], row["hist_genre"], strict=True) if i not in cold]
        expected_rows.append((row["user_id"], row["item_id"], row["timestamp"], pairs))
    rows = [
        (r.user_id, r.item_id, r.timestamp, list(zip(r.hist_item_id, r.hist_genre, strict=True)))
        for r in got["train"].itertuples()
    ]
    assert rows == expected_rows
    for split in ("val", "test"):
        pd.testing.assert_frame_equal(got[split], splits[split])
    assert cold & set(got["test"]["item_id"])  # cold items are still clicked in test: the protocol's point
    # the same items are cold on every run (seeded), another seed draws others
    ids = catalogue["item_id"].to_numpy()
    assert prepare.make_cold(splits, ids, 0.2, 0)[1] == sorted(cold)
    assert set(prepare.make_cold(splits, ids, 0.2, 1)[1]) != cold
