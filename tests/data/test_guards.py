"""Data that would train or score wrong is caught by `recsys data check` and by training, naming the file,
column and row: values beyond float32, a numeric column with no value to impute from, a duplicated
column, a corrupt data page, a one-class evaluation split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys.data.arrow import DataError
from recsys.data.check import check
from recsys.data.vocab import Vocabulary
from tests.conftest import TINY_SCHEMA, write_dataset


def _edit(file: Path, column: str, values: list, kind: pa.DataType | None = None) -> None:
    table = pq.read_table(file)
    pq.write_table(
        table.set_column(table.schema.get_field_index(column), column, pa.array(values, type=kind)),
        file,
        row_group_size=256,
    )


def _messages(data: Path) -> list[str]:
    return [f.text() for f in check(data, progress=False).errors]


def test_a_value_beyond_float32_is_named_by_check_and_by_training(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "d")
    train = data / "train" / "part-0.parquet"
    price = pq.read_table(train).column("price").to_pylist()
    price[17] = 1e160  # finite in float64, inf in the model's float32: the statistics overflowed silently
    _edit(train, "price", price)
    assert any(
        "column 'price': missing, NaN, inf or beyond float32" in m and "first at row 17" in m for m in _messages(data)
    ), _messages(data)
    with pytest.raises(
        DataError,
        match=r"part-0.parquet: column 'price' row 17: numeric value 1e\+160 is missing, "
        r"non-finite or beyond float32",
    ):
        Vocabulary.load_or_build(data)


def test_an_all_null_numeric_column_has_no_mean_to_impute(tmp_path: Path) -> None:
    data = write_dataset(
        tmp_path / "d",
        schema=TINY_SCHEMA.replace("{name: price, type: numeric}", "{name: price, type: numeric, missing: mean}"),
    )
    for split in ("train", "val", "test"):
        file = data / split / "part-0.parquet"
        _edit(file, "price", [None] * pq.read_metadata(file).num_rows, pa.float64())
    assert any("column 'price': no usable value in train: `missing: mean` has no mean" in m for m in _messages(data))
    with pytest.raises(DataError, match="column 'price' has no usable value in the train split"):
        Vocabulary.load_or_build(data)


def test_a_duplicated_column_is_named(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "d")
    file = data / "val" / "part-0.parquet"
    table = pq.read_table(file)
    pq.write_table(table.append_column(pa.field("price", pa.float64()), table.column("price")), file)
    assert any("column 'price' appears 2 times" in m for m in _messages(data))
    from recsys.data.datamodule import CTRDataModule

    with pytest.raises(DataError, match="val/part-0.parquet: column 'price' appears 2 times"):
        CTRDataModule(str(data)).stream("val")


def test_a_corrupt_data_page_names_the_file_and_row_group(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "d")
    file = data / "train" / "part-0.parquet"
    meta = pq.read_metadata(file)
    chunk = meta.row_group(3).column(meta.schema.names.index("user"))
    raw = bytearray(file.read_bytes())
    start = chunk.data_page_offset
    raw[start + 8 : start + 40] = b"\xff" * 32  # the page header and data of row group 3's user column
    file.write_bytes(bytes(raw))
    assert any("row group 3 is unreadable" in m for m in _messages(data))
    with pytest.raises(DataError, match="train/part-0.parquet: row group 3 is unreadable"):
        Vocabulary.load_or_build(data)


def test_a_one_class_split_reports_auc_as_undefined_not_zero(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import torch

    from recsys.commands.eval import main as eval_main
    from recsys.data.datamodule import CTRDataModule
    from recsys.models.base import EmbeddingMLP
    from tests.test_composition import save_checkpoint

    data = write_dataset(tmp_path / "d")
    test_file = data / "test" / "part-0.parquet"
    _edit(test_file, "click", np.zeros(pq.read_metadata(test_file).num_rows, dtype=np.int64).tolist())
    assert any(
        "only label(s) [0.0] in this split: AUC is undefined" in f.text() for f in check(data, progress=False).notes
    )
    dm = CTRDataModule(str(data))
    ckpt = save_checkpoint(EmbeddingMLP(dm.dataset_info, embedding={"dim": 8}), tmp_path / "m.ckpt")
    assert eval_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "r"), "--bootstrap", "20"]) == 1
    report = json.loads((tmp_path / "r" / "report.json").read_text())  # valid JSON: NaN is not
    assert report["auc"] is None and report["gauc"] is None and report["logloss"] > 0
    assert "AUC is undefined: the test split has one class only" in capsys.readouterr().err
    assert "undefined (one class)" in (tmp_path / "r" / "report.md").read_text()
    model = EmbeddingMLP(dm.dataset_info, embedding={"dim": 8})
    loss = np.full(8, -np.log(0.7), np.float32)  # label 0 at p = 0.3: −log(1 − 0.3) per row
    model._outputs["test"] = [
        {"prob": np.full(8, 0.3, np.float32), "label": np.zeros(8, np.float32), "group": np.arange(8), "loss": loss}
    ]
    logged = {}
    model.log = lambda name, value, **kwargs: logged.__setitem__(name, value)  # noqa: ARG005
    with pytest.warns(UserWarning, match=r"the test split has label\(s\) \[0.0\] only: auc, gauc undefined"):
        model.on_test_epoch_end()
    assert np.isnan(logged["test/auc"]) and torch.isfinite(torch.tensor(logged["test/logloss"]))
    assert logged["test/loss"] == pytest.approx(-np.log(0.7))
