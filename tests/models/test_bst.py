from pathlib import Path

import lightning as L
import pytest
import torch

from recsys.data.batch import make_kjt
from recsys.data.datamodule import CTRDataModule
from recsys.models.bst import BST
from tests.conftest import fit_and_auc, write_dataset

SMALL = {"transformer_dim": 8, "transformer_heads": 2, "dnn_hidden_units": [16], "transformer_dropout": 0.0}


def test_forward_shapes_and_the_sequence_tables_get_gradient(tiny_dataset: Path) -> None:
    dm = CTRDataModule(str(tiny_dataset), batch_size=64)
    model = BST(dm.dataset_info, embedding={"dim": 8}, **SMALL)
    assert model.pooled == ["user", "tags", "city"]
    batch = next(iter(dm.stream("train")))
    logits = model(batch)
    assert logits.shape == (64,)
    logits.sum().backward()
    assert model.embedding.table_weight("t_item").grad.abs().sum() > 0
    assert model.encoders[0].position.weight.grad.abs().sum() > 0
    assert model.dnn.layers[0].in_features == 3 * 8 + 2 * 8 + 1  # pooled + (target token ⊕ mean) + numeric


def test_history_changes_the_prediction_only_for_rows_that_have_one(tiny_dataset: Path) -> None:
    dm = CTRDataModule(str(tiny_dataset), batch_size=32)
    model = BST(dm.dataset_info, embedding={"dim": 8}, **SMALL).eval()
    batch = next(iter(dm.stream("val")))
    history = batch.sequences.to_dict()["hist_item"]
    empty = make_kjt({"hist_item": (history.values()[:0].numpy(), torch.zeros(len(batch), dtype=torch.int32).numpy())})
    with torch.no_grad():
        base, without = model(batch), model(type(batch)(batch.dense, batch.sparse, empty, batch.labels, batch.groups))
    had = history.lengths() > 0
    assert torch.allclose(base[~had], without[~had]) and not torch.allclose(base[had], without[had])


def test_learns_the_planted_signal(tiny_dataset: Path) -> None:
    L.seed_everything(0)
    dm = CTRDataModule(str(tiny_dataset), batch_size=128)
    model = BST(dm.dataset_info, embedding={"dim": 8}, optimizer=lambda p: torch.optim.Adam(p, lr=0.01), **SMALL)
    assert fit_and_auc(model, dm) > 0.72


def test_needs_a_sequence_feature(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "flat", schema="label: click\nfeatures:\n  - {name: item, type: categorical}\n")
    with pytest.raises(ValueError, match="BST needs at least one 'sequence' feature"):
        BST(CTRDataModule(str(root)).dataset_info)
