from pathlib import Path

import lightning as L
import torch

from recsys.data.datamodule import CTRDataModule
from recsys.models.finalmlp import FinalMLP
from tests.conftest import fit_and_auc

SMALL = {"mlp1_hidden_units": [16], "mlp2_hidden_units": [8], "gate_hidden_units": [8]}


def test_forward_shapes_and_every_table_and_layer_gets_gradient(tiny_dataset: Path) -> None:
    dm = CTRDataModule(str(tiny_dataset), batch_size=64)
    model = FinalMLP(dm.dataset_info, embedding={"dim": 8}, **SMALL)
    batch = next(iter(dm.stream("train")))
    logits = model(batch)
    assert logits.shape == (64,)
    logits.sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_learns_the_planted_signal(tiny_dataset: Path) -> None:
    L.seed_everything(0)
    dm = CTRDataModule(str(tiny_dataset), batch_size=128)
    model = FinalMLP(dm.dataset_info, embedding={"dim": 8}, optimizer=lambda p: torch.optim.Adam(p, lr=0.01), **SMALL)
    # the planted logit's AUC on this data is about 0.8; an untrained model gives about 0.5
    assert fit_and_auc(model, dm) > 0.72


def test_gates_take_the_named_context_features(tiny_dataset: Path) -> None:
    import pytest

    dm = CTRDataModule(str(tiny_dataset), batch_size=32)
    model = FinalMLP(dm.dataset_info, embedding={"dim": 8}, gate1_context=["user"], gate2_context=["item", "city"],
                     fusion_heads=4, mlp1_hidden_units=[16], mlp2_hidden_units=[8], gate_hidden_units=[8])
    assert model.gates[0].gate.layers[0].in_features == 8 and model.gates[1].gate.layers[0].in_features == 16
    assert model(next(iter(dm.stream("train")))).shape == (32,)
    with pytest.raises(ValueError, match="gate context 'nope' is not a pooled feature"):
        FinalMLP(dm.dataset_info, gate1_context=["nope"])
