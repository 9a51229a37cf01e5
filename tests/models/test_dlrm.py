from pathlib import Path

import lightning as L
import torch

from recsys.data.datamodule import CTRDataModule
from recsys.models.dlrm import DLRM
from tests.conftest import TINY_SCHEMA, fit_and_auc, write_dataset


def test_forward_shapes_and_widths(tiny_dataset: Path) -> None:
    dm = CTRDataModule(str(tiny_dataset), batch_size=64)
    model = DLRM(dm.dataset_info, embedding={"dim": 8}, bottom_hidden_units=[16], top_hidden_units=[32])
    batch = next(iter(dm.stream("train")))
    assert model(batch).shape == (64,)
    # 5 pooled vectors (user, item, tags, city, hist_item) + the bottom MLP's: 15 pairs, plus x itself
    assert model.top.layers[0].in_features == 6 * 5 // 2 + 8


def test_fields_of_another_width_are_projected_to_the_interaction_width(tmp_path: Path) -> None:
    schema = TINY_SCHEMA.replace(
        "{name: city, type: categorical, num_buckets: 7}",
        "{name: city, type: categorical, num_buckets: 7, embedding_dim: 4}",
    )
    dm = CTRDataModule(str(write_dataset(tmp_path / "d", schema=schema)), batch_size=32)
    model = DLRM(dm.dataset_info, embedding={"dim": 8}, bottom_hidden_units=[16], top_hidden_units=[32])
    assert set(model.fields.project) == {"city"} and model.fields.project["city"].in_features == 4
    batch = next(iter(dm.stream("train")))
    embedded = model.embedding(batch)
    vectors = model.fields(embedded.pooled)
    assert vectors.shape == (32, 5, 8)
    torch.testing.assert_close(vectors[:, 3], embedded.pooled["city"] @ model.fields.project["city"].weight.T)
    torch.testing.assert_close(vectors[:, 0], embedded.pooled["user"])  # already 8 wide: passed as it is


def test_learns_the_planted_signal(tiny_dataset: Path) -> None:
    L.seed_everything(0)
    dm = CTRDataModule(str(tiny_dataset), batch_size=128)
    model = DLRM(
        dm.dataset_info,
        embedding={"dim": 8},
        bottom_hidden_units=[16],
        top_hidden_units=[32],
        optimizer=lambda p: torch.optim.Adam(p, lr=0.01),
    )
    # the planted logit's AUC on this data is about 0.8; an untrained model gives about 0.5
    assert fit_and_auc(model, dm) > 0.72
