from pathlib import Path

import numpy as np
import pytest
import torch

from recsys.data.batch import Batch, make_kjt
from recsys.data.datamodule import CTRDataModule
from recsys.data.vocab import DatasetInfo
from recsys.embedding.tables import IdGuard, pooled_tables, table_configs
from recsys.models.base import EmbeddingMLP


def _info(root: Path) -> DatasetInfo:
    return DatasetInfo.from_any(CTRDataModule(str(root)).dataset_info)


def test_sequences_share_their_target_table(tiny_dataset: Path) -> None:
    configs = {c.name: c for c in table_configs(_info(tiny_dataset), embedding_dim=8)}
    assert configs["t_item"].feature_names == ["item", "hist_item"]
    assert configs["t_city"].num_embeddings == 8  # 7 hash buckets + the null/OOV row
    assert set(configs) == {"t_user", "t_item", "t_tags", "t_city"}


def test_schema_embedding_dim_overrides_default(tmp_path: Path) -> None:
    from tests.conftest import TINY_SCHEMA, write_dataset

    root = write_dataset(tmp_path / "d", schema=TINY_SCHEMA.replace("{name: user, type: categorical}", "{name: user, type: categorical, embedding_dim: 4}"))
    configs = {c.name: c for c in table_configs(_info(root), embedding_dim=8)}
    assert configs["t_user"].embedding_dim == 4 and configs["t_item"].embedding_dim == 8


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_pooled_tables_match_a_plain_reference(tiny_dataset: Path, pooling: str) -> None:
    tables = pooled_tables(_info(tiny_dataset), embedding_dim=4, pooling=pooling)
    kjt = make_kjt({"item": (np.array([3, 5, 7]), np.array([1, 1, 1])),
                    "hist_item": (np.array([1, 2, 2, 9]), np.array([2, 0, 2]))} | {
                    k: (np.array([1, 1, 1]), np.array([1, 1, 1])) for k in ("user", "tags", "city")})
    out = tables(kjt).to_dict()
    weight = tables.embedding_bags["t_item"].weight.detach()
    expected_hist = torch.stack([
        weight[[1, 2]].sum(0) if pooling == "sum" else weight[[1, 2]].mean(0),
        torch.zeros(4),
        weight[[2, 9]].sum(0) if pooling == "sum" else weight[[2, 9]].mean(0),
    ])
    assert torch.allclose(out["hist_item"], expected_hist, atol=1e-6)
    assert torch.allclose(out["item"], weight[[3, 5, 7]], atol=1e-6)


def test_guard_stops_out_of_range_ids_before_the_kernel() -> None:
    guard = IdGuard({"item": 10, "user": 5})
    ok = make_kjt({"item": (np.array([0, 9]), np.array([1, 1])), "user": (np.array([4, 0]), np.array([1, 1]))})
    assert guard(ok) is ok
    for bad_value, feature in ((10, "item"), (-1, "item")):
        bad = make_kjt({"item": (np.array([0, bad_value]), np.array([1, 1])), "user": (np.array([1, 2]), np.array([1, 1]))})
        with pytest.raises(IndexError, match=rf"feature '{feature}': id {bad_value} outside its table of 10 rows"):
            guard(bad)
    bad_user = make_kjt({"item": (np.array([0, 1]), np.array([1, 1])), "user": (np.array([1, 5]), np.array([1, 1]))})
    with pytest.raises(IndexError, match="feature 'user': id 5 outside its table of 5 rows"):
        guard(bad_user)


def test_model_refuses_out_of_range_ids(tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dm = CTRDataModule(str(tiny_dataset))
    model = EmbeddingMLP(dm.dataset_info, embedding_dim=4)
    batch = next(iter(dm.stream("val")))
    rows = model.info.num_embeddings["item"]
    sparse = batch.sparse.to_dict()
    values = {k: (v.values().numpy().copy(), v.lengths().numpy()) for k, v in sparse.items()}
    values["item"][0][3] = rows  # one past the end
    calls = []
    monkeypatch.setattr(model.tables, "forward", lambda kjt: calls.append(kjt))
    bad = Batch(batch.dense, make_kjt(values), batch.sequences, batch.labels, batch.groups)
    with pytest.raises(IndexError, match=f"feature 'item': id {rows} outside its table of {rows} rows"):
        model(bad)
    assert calls == []  # the embedding kernel was never called
