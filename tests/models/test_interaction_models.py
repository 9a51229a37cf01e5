"""What every feature-interaction model must do, checked once for each: every table and layer gets a
gradient from the logit, and training finds the planted signal of the tiny dataset (whose planted
logit has AUC about 0.8; an untrained model gives about 0.5). Model-specific checks live in
test_<model>.py."""

from pathlib import Path

import lightning as L
import pytest
import torch

from recsys.data.datamodule import CTRDataModule
from recsys.models.dcnv2 import DCNv2
from recsys.models.deepfm import DeepFM
from recsys.models.finalmlp import FinalMLP
from tests.conftest import fit_and_auc

SMALL = {
    DeepFM: {"dnn_hidden_units": [16]},
    DCNv2: {"cross_layers": 2, "dnn_hidden_units": [16]},
    FinalMLP: {"mlp1_hidden_units": [16], "mlp2_hidden_units": [8], "gate_hidden_units": [8]},
}
MODELS = pytest.mark.parametrize("cls", list(SMALL), ids=lambda c: c.__name__)


@MODELS
def test_forward_shapes_and_every_table_and_layer_gets_gradient(cls: type, tiny_dataset: Path) -> None:
    dm = CTRDataModule(str(tiny_dataset), batch_size=64)
    model = cls(dm.dataset_info, embedding={"dim": 8}, **SMALL[cls])
    batch = next(iter(dm.stream("train")))
    logits = model(batch)
    assert logits.shape == (64,)
    logits.sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@MODELS
def test_learns_the_planted_signal(cls: type, tiny_dataset: Path) -> None:
    L.seed_everything(0)
    dm = CTRDataModule(str(tiny_dataset), batch_size=128)
    model = cls(dm.dataset_info, embedding={"dim": 8}, optimizer=lambda p: torch.optim.Adam(p, lr=0.01), **SMALL[cls])
    assert fit_and_auc(model, dm) > 0.72
