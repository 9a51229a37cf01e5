import importlib.util
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from recsys.data.parquet import ParquetStream
from recsys.data.vocab import Vocabulary
from tests.conftest import ROOT


def _load(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem + "_mod", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


criteo = _load("datasets/criteo/prepare.py")
synthetic = _load("datasets/synthetic/generate.py")


def _criteo_lines(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        label = str(rng.integers(0, 2))
        ints = ["" if rng.random() < 0.2 else str(rng.integers(-2, 500)) for _ in range(13)]
        cats = ["" if rng.random() < 0.1 else f"{rng.integers(0, 50):08x}" for _ in range(26)]
        lines.append("\t".join([label, *ints, *cats]))
    return lines


def test_criteo_streams_in_blocks_into_the_contract(tmp_path: Path) -> None:
    lines = _criteo_lines(3000)
    src = tmp_path / "day_0"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "criteo"
    rows = criteo.convert(
        [(src, None)], out, val_fraction=0.1, test_fraction=0.1, block_size=16 << 10, rows_per_file=700
    )
    assert sum(rows.values()) == 3000 and rows["val"] > 200 and rows["test"] > 200
    assert len(list((out / "train").glob("part-*.parquet"))) >= 3  # rolled over files
    table = pq.read_table(out / "train").to_pandas()
    assert list(table.columns[:3]) == ["label", "I1", "I2"] and len(table.columns) == 40
    # log1p(max(x, 0)) with empty -> 0; empty categoricals stay null
    assert table["I1"].min() >= 0 and np.isfinite(table["I1"]).all()
    assert table["C1"].isna().any()
    vocab = Vocabulary.load_or_build(out)
    assert vocab.num_embeddings("C1") <= 51
    batch = next(iter(ParquetStream(out, "val", vocab, batch_size=64)))
    assert batch.dense.shape == (64, 13) and len(batch.sparse.keys()) == 26


def test_criteo_explicit_split_files_and_hashing(tmp_path: Path) -> None:
    files = {}
    for i, split in enumerate(("train", "val", "test")):
        files[split] = tmp_path / f"day_{i}"
        files[split].write_text("\n".join(_criteo_lines(200, seed=i)) + "\n")
    out = tmp_path / "tb"
    rows = criteo.convert([(f, s) for s, f in files.items()], out, num_buckets=1000)
    assert rows == {"train": 200, "val": 200, "test": 200}
    first = files["train"].read_text().splitlines()[0].split("\t")
    row = pq.read_table(out / "train").slice(0, 1).to_pylist()[0]
    assert row["label"] == int(first[0])
    for i in range(1, 14):
        assert row[f"I{i}"] == pytest.approx(np.log1p(max(float(first[i] or 0), 0.0)), rel=1e-6)
    assert row["C1"] == (first[14] or None)
    assert "num_buckets: 1000" in (out / "schema.yaml").read_text()
    assert Vocabulary.load_or_build(out).num_embeddings("C5") == 1001


def test_criteo_bad_lines_are_named(tmp_path: Path) -> None:
    lines = _criteo_lines(50)
    lines[30] = "7" + lines[30][1:]
    src = tmp_path / "bad_label"
    src.write_text("\n".join(lines) + "\n")
    with pytest.raises(criteo.CriteoError, match=rf"{src}: line 31: label must be 0 or 1, got 7"):
        criteo.convert([(src, "train")], tmp_path / "o1")
    short = tmp_path / "short"
    short.write_text("\n".join(_criteo_lines(5) + ["1\t2\t3"]) + "\n")
    with pytest.raises(criteo.CriteoError, match=rf"{short}: malformed line"):
        criteo.convert([(short, "train")], tmp_path / "o2")
    with pytest.raises(criteo.CriteoError, match="input file not found"):
        criteo.convert([(tmp_path / "nope", None)], tmp_path / "o3")


def test_synthetic_has_zipf_ids_and_a_learnable_signal(tmp_path: Path) -> None:
    info = synthetic.generate(
        tmp_path / "syn", rows=60_000, chunk_rows=16_000, seed=3, rows_per_file=20_000, max_cardinality=5000
    )
    assert sum(info["rows"].values()) == 60_000
    assert 0.15 < info["positive_rate"] < 0.45 and info["planted_auc"] > 0.75
    train = pq.read_table(tmp_path / "syn" / "train").to_pandas()
    top_share = train["C26"].value_counts(normalize=True).iloc[:10].sum()
    assert top_share > 0.2  # Zipf: a few ids take a large share of rows
    assert train["C26"].nunique() > 500
    again = synthetic.generate(
        tmp_path / "syn2", rows=60_000, chunk_rows=16_000, seed=3, rows_per_file=20_000, max_cardinality=5000
    )
    assert again["planted_auc"] == info["planted_auc"]  # seeded
