from pathlib import Path

import lightning as L
import torch

from recsys.data.datamodule import CTRDataModule
from recsys.models.dcnv2 import DCNv2
from tests.conftest import fit_and_auc

SMALL = {"cross_layers": 2, "dnn_hidden_units": [16]}


def test_forward_shapes_and_every_table_and_layer_gets_gradient(tiny_dataset: Path) -> None:
    dm = CTRDataModule(str(tiny_dataset), batch_size=64)
    model = DCNv2(dm.dataset_info, embedding={"dim": 8}, **SMALL)
    batch = next(iter(dm.stream("train")))
    logits = model(batch)
    assert logits.shape == (64,)
    logits.sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_learns_the_planted_signal(tiny_dataset: Path) -> None:
    L.seed_everything(0)
    dm = CTRDataModule(str(tiny_dataset), batch_size=128)
    model = DCNv2(dm.dataset_info, embedding={"dim": 8}, optimizer=lambda p: torch.optim.Adam(p, lr=0.01), **SMALL)
    # the planted logit's AUC on this data is about 0.8; an untrained model gives about 0.5
    assert fit_and_auc(model, dm) > 0.72


def test_stacked_and_low_rank_mixture_variants(tiny_dataset: Path) -> None:
    import pytest

    dm = CTRDataModule(str(tiny_dataset), batch_size=32)
    batch = next(iter(dm.stream("train")))
    stacked = DCNv2(dm.dataset_info, embedding={"dim": 8}, structure="stacked", cross_low_rank=4, cross_experts=2, **SMALL)
    assert stacked(batch).shape == (32,) and stacked.out.in_features == 16  # the DNN's output only
    parallel = DCNv2(dm.dataset_info, embedding={"dim": 8}, **SMALL)
    assert parallel.out.in_features == 16 + 5 * 8 + 1  # DNN ⊕ cross output (all inputs)
    with pytest.raises(ValueError, match="structure must be one of"):
        DCNv2(dm.dataset_info, structure="sideways")
