from pathlib import Path

import lightning as L
import torch

from recsys.data.datamodule import CTRDataModule
from recsys.models.deepfm import DeepFM
from tests.conftest import fit_and_auc

SMALL = {"dnn_hidden_units": [16]}


def test_forward_shapes_and_every_table_and_layer_gets_gradient(tiny_dataset: Path) -> None:
    dm = CTRDataModule(str(tiny_dataset), batch_size=64)
    model = DeepFM(dm.dataset_info, embedding={"dim": 8}, **SMALL)
    batch = next(iter(dm.stream("train")))
    logits = model(batch)
    assert logits.shape == (64,)
    logits.sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_learns_the_planted_signal(tiny_dataset: Path) -> None:
    L.seed_everything(0)
    dm = CTRDataModule(str(tiny_dataset), batch_size=128)
    model = DeepFM(dm.dataset_info, embedding={"dim": 8}, optimizer=lambda p: torch.optim.Adam(p, lr=0.01), **SMALL)
    # the planted logit's AUC on this data is about 0.8; an untrained model gives about 0.5
    assert fit_and_auc(model, dm) > 0.72


def test_the_logit_is_first_order_plus_the_pairwise_fm_plus_dnn(tiny_dataset: Path) -> None:
    dm = CTRDataModule(str(tiny_dataset), batch_size=16)
    model = DeepFM(dm.dataset_info, embedding={"dim": 8}, **SMALL).eval()
    batch = next(iter(dm.stream("val")))
    embedded = model.embedding(batch)
    x = torch.cat([embedded.cat(model.pooled), batch.dense], dim=1)
    fields = [embedded.pooled[f] for f in model.pooled]  # every field 8 wide: no projection
    pairs = sum((fields[i] * fields[j]).sum(1) for i in range(len(fields)) for j in range(i + 1, len(fields)))
    linear = x @ model.first_order.weight[0] + model.first_order.bias[0]
    torch.testing.assert_close(model(batch), linear + pairs + model.dnn(x)[:, 0], atol=1e-5, rtol=1e-5)
