"""`recsys data check`: every problem at once; and numeric imputation declared in the schema."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys.commands.data import main as check_main
from recsys.data.arrow import DataError
from recsys.data.check import check
from recsys.data.parquet import ParquetStream
from recsys.data.vocab import Vocabulary
from tests.conftest import TINY_SCHEMA, write_dataset


def _rewrite(root: Path, split: str, change) -> Path:  # noqa: ANN001
    file = root / split / "part-0.parquet"
    pq.write_table(change(pq.read_table(file)), file, row_group_size=256)
    return file


def _set(t: pa.Table, name: str, values) -> pa.Table:  # noqa: ANN001
    return t.set_column(t.schema.get_field_index(name), name, values)


def test_a_clean_dataset_passes(tiny_dataset: Path, capsys: pytest.CaptureFixture) -> None:
    report = check(tiny_dataset, progress=False)
    assert not report.errors and report.rows == {"train": 3000, "val": 600, "test": 600}
    assert any("empty list" in f.message for f in report.notes)  # tags and histories can be empty
    assert check_main(["check", str(tiny_dataset)]) == 0
    assert "OK — 0 error(s)" in capsys.readouterr().out


def test_every_problem_is_reported_at_once(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = write_dataset(tmp_path / "d")

    def train_problems(t: pa.Table) -> pa.Table:
        labels = t.column("click").to_numpy().astype(float)
        labels[[7, 9]] = [2, np.nan]
        price = t.column("price").to_numpy().copy()
        price[[3, 400, 401]] = [np.nan, np.inf, np.nan]
        return _set(_set(t, "click", pa.array(labels)), "price", pa.array(price))

    _rewrite(root, "train", train_problems)
    drifted = _rewrite(root, "val", lambda t: _set(t, "item", pa.array([str(v) for v in t.column("item").to_pylist()])))
    _rewrite(root, "test", lambda t: t.drop_columns(["price"]))
    corrupt = root / "test" / "part-1.parquet"
    corrupt.write_bytes(b"PAR1 not really parquet")
    report = check(root, progress=False)
    texts = [f.text() for f in report.errors]
    assert any("column 'click': label is not 0 or 1 (or missing) (2 row(s), first at row 7)" in t for t in texts), texts
    assert any(
        "column 'price': missing, NaN, inf or beyond float32 (|x| > 3.4e38) "
        "numeric value (schema: missing: error) (3 row(s), first at row 3)" in t
        for t in texts
    ), texts
    assert any(str(drifted) in t and "str ids here but int ids in train (schema drift)" in t for t in texts), texts
    assert any("missing column(s) ['price']" in t for t in texts), texts
    assert any(str(corrupt) in t and "cannot read as Parquet" in t for t in texts), texts
    assert any("test: the split has no rows" in t for t in texts), texts  # both test files are unusable
    out = tmp_path / "report.json"
    assert check_main(["check", str(root), "--json", str(out)]) == 1
    assert "FAILED — 6 error(s)" in capsys.readouterr().out
    assert json.loads(out.read_text())["ok"] is False


def test_missing_schema_is_an_error_not_a_crash(tmp_path: Path) -> None:
    report = check(tmp_path, progress=False)
    assert len(report.errors) == 1 and "schema.yaml" in report.errors[0].file


@pytest.mark.parametrize("policy", ["mean", "zero"])
def test_numeric_missing_values_imputed_as_the_schema_says(tmp_path: Path, policy: str) -> None:
    schema = TINY_SCHEMA.replace("{name: price, type: numeric}", f"{{name: price, type: numeric, missing: {policy}}}")
    root = write_dataset(tmp_path / "d", schema=schema)

    def holes(t: pa.Table) -> pa.Table:
        price = pa.array(
            [None if i % 10 == 0 else v for i, v in enumerate(t.column("price").to_pylist())], type=pa.float64()
        )
        return _set(t, "price", price)

    _rewrite(root, "train", holes)
    _rewrite(root, "val", holes)
    vocab = Vocabulary.load_or_build(root)
    present = pq.read_table(root / "train").column("price").drop_null().to_numpy()
    mean, std = vocab.numeric_stats["price"]
    assert mean == pytest.approx(present.mean()) and std == pytest.approx(present.std(), rel=1e-6)
    batch = next(iter(ParquetStream(root, "val", vocab, batch_size=600)))
    filled = batch.dense[::10, 0].numpy()
    expected = 0.0 if policy == "mean" else (0.0 - mean) / std
    np.testing.assert_allclose(filled, expected, atol=1e-6)
    assert np.isfinite(batch.dense.numpy()).all()
    assert not check(root, progress=False).errors
    assert any("imputed" in f.message for f in check(root, progress=False).notes)


def test_missing_policy_is_validated(tmp_path: Path) -> None:
    from recsys.data.schema import SchemaError

    bad = TINY_SCHEMA.replace("{name: price, type: numeric}", "{name: price, type: numeric, missing: median}")
    with pytest.raises(SchemaError, match="missing must be one of"):
        Vocabulary.load_or_build(write_dataset(tmp_path / "d", schema=bad))
    bad = TINY_SCHEMA.replace("{name: item, type: categorical}", "{name: item, type: categorical, missing: mean}")
    with pytest.raises(SchemaError, match="'missing' applies to numeric features only"):
        Vocabulary.load_or_build(write_dataset(tmp_path / "e", schema=bad))
    with pytest.raises(DataError, match="declare `missing: mean`"):
        root = write_dataset(tmp_path / "f")
        _rewrite(root, "train", lambda t: _set(t, "price", pa.array([None] * len(t), type=pa.float64())))
        Vocabulary.load_or_build(root)
