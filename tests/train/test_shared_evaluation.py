"""A rank's share of an evaluation batch: padded rows are scored (the collective forward needs them)
but never counted; the gather across ranks is exercised by the 2-rank Lightning test (test_strategy)."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from recsys.data.datamodule import CTRDataModule
from recsys.data.parquet import ParquetStream
from recsys.models.base import EmbeddingMLP


def test_padded_rows_are_scored_but_never_counted(tiny_dataset: Path) -> None:
    dm = CTRDataModule(str(tiny_dataset))
    model = EmbeddingMLP(dm.dataset_info, embedding={"dim": 8}).eval()
    stream = ParquetStream(tiny_dataset, "val", dm.vocab, batch_size=7, rank=0, world_size=1, share=(1, 2))
    batch = next(iter(stream))  # rows 4..6 of the first 7, then one repeat of row 0
    assert (len(batch), batch.padded, batch.shares) == (4, 1, 2)
    with torch.no_grad():
        model.validation_step(batch, 0)
        expected = torch.sigmoid(model(batch))[:3].numpy()  # the plain reference: score all, keep the real rows
    kept = model._outputs["val"][-1]
    np.testing.assert_allclose(kept["prob"], expected, rtol=1e-6)
    labels = batch.labels[:3].numpy()
    cross_entropy = -(labels * np.log(expected) + (1 - labels) * np.log(1 - expected))  # by the formula
    np.testing.assert_allclose(kept["loss"], cross_entropy, rtol=1e-5)
    assert kept["label"].tolist() == batch.labels[:3].tolist() and model._shares["val"] == 2
    # a share that is padding only (a last batch smaller than the ranks) adds no rows and no NaN loss
    empty = replace(batch, padded=len(batch))
    with torch.no_grad():
        model.validation_step(empty, 1)
    assert len(model._outputs["val"]) == 1
