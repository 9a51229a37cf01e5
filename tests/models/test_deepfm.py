from pathlib import Path

import torch

from recsys.data.datamodule import CTRDataModule
from recsys.models.deepfm import DeepFM

SMALL = {"dnn_hidden_units": [16]}


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
