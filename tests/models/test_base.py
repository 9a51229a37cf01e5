from pathlib import Path

import lightning as L
import torch

from recsys.data.datamodule import CTRDataModule
from recsys.models.base import EmbeddingMLP
from tests.conftest import fit_and_auc


def test_forward_shapes_and_every_table_gets_gradient(tiny_dataset: Path) -> None:
    dm = CTRDataModule(str(tiny_dataset), batch_size=64)
    model = EmbeddingMLP(dm.dataset_info, embedding={"dim": 8}, dnn_hidden_units=[16])
    batch = next(iter(dm.stream("train")))
    logits = model(batch)
    assert logits.shape == (64,)
    logits.sum().backward()
    for name, bag in model.embedding.bags.embedding_bags.items():
        assert bag.weight.grad is not None and bag.weight.grad.abs().sum() > 0, name
    # input width: 4 tables x 8 dims + the sequence pooled from the item table + 1 numeric
    assert model.dnn.layers[0].in_features == 5 * 8 + 1


def test_learns_the_planted_signal(tiny_dataset: Path) -> None:
    L.seed_everything(0)
    dm = CTRDataModule(str(tiny_dataset), batch_size=128)
    model = EmbeddingMLP(
        dm.dataset_info, embedding={"dim": 8}, dnn_hidden_units=[32], optimizer=lambda p: torch.optim.Adam(p, lr=0.01)
    )
    # the planted logit's AUC on this data is about 0.8; an untrained model gives about 0.5
    assert fit_and_auc(model, dm) > 0.72
