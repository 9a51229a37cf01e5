from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from recsys.data.batch import make_kjt
from recsys.data.datamodule import CTRDataModule
from recsys.data.parquet import ParquetStream
from recsys.embedding.hashing import feature_salt, hash_to_rows
from recsys.embedding.unified import UnifiedEmbeddingBag, UnifiedSpec, multiplex
from recsys.models.base import EmbeddingMLP

OWNERS = {"user": "user", "item": "item", "hist_item": "item"}


def _kjt():
    return make_kjt({
        "user": (np.array([5, 5, 9]), np.array([1, 1, 1])),
        "item": (np.array([5, 7, 7]), np.array([1, 1, 1])),
        "hist_item": (np.array([7, 5, 1, 2]), np.array([2, 0, 2])),
    })


def test_probe_counts_and_output_dims() -> None:
    module = UnifiedEmbeddingBag(OWNERS, UnifiedSpec(rows=50, dim=4, num_tables=2, default_probes=2, probes={"user": 3}), "mean")
    out = module(_kjt()).to_dict()
    assert {k: tuple(v.shape) for k, v in out.items()} == {"user": (3, 12), "item": (3, 8), "hist_item": (3, 8)}
    names = {c.name: c.feature_names for c in module.tables.embedding_bag_configs()}
    assert names == {"unified_0": ["user@0", "user@2", "item@0", "hist_item@0"], "unified_1": ["user@1", "item@1", "hist_item@1"]}


def test_same_raw_id_in_two_features_lands_in_different_rows() -> None:
    spec = UnifiedSpec(rows=1000, dim=4, default_probes=2)
    probes = multiplex(_kjt(), OWNERS, spec).to_dict()
    assert probes["user@0"].values()[0] != probes["item@0"].values()[0]  # id 5 as a user and as an item
    assert probes["item@0"].values()[0] != probes["item@1"].values()[0]  # two probes of one feature
    # a sequence shares its target's salts: item 7 in the history hits item 7's rows
    assert probes["hist_item@0"].values()[0] == probes["item@0"].values()[1]


def test_matches_a_plain_gather_and_concat_reference() -> None:
    torch.manual_seed(0)
    spec = UnifiedSpec(rows=64, dim=3, num_tables=2, default_probes=2)
    module = UnifiedEmbeddingBag(OWNERS, spec, "mean")
    out = module(_kjt()).to_dict()
    weights = [module.tables.embedding_bags[f"unified_{t}"].weight.detach() for t in range(2)]

    def reference(owner: str, ids: list[list[int]]) -> torch.Tensor:
        rows = []
        for bag in ids:
            parts = []
            for probe in range(2):
                if not bag:
                    parts.append(torch.zeros(3))
                    continue
                hashed = hash_to_rows(torch.tensor(bag), feature_salt(owner, probe), 64)
                parts.append(weights[probe % 2][hashed].mean(0))
            rows.append(torch.cat(parts))
        return torch.stack(rows)

    assert torch.allclose(out["user"], reference("user", [[5], [5], [9]]), atol=1e-6)
    assert torch.allclose(out["hist_item"], reference("item", [[7, 5], [], [1, 2]]), atol=1e-6)


def test_base_model_with_unified_tables_learns(tiny_dataset: Path) -> None:
    import lightning as L

    from recsys.eval.metrics import auc
    from recsys.eval.report import predict_split

    L.seed_everything(0)
    dm = CTRDataModule(str(tiny_dataset), batch_size=128)
    model = EmbeddingMLP(dm.dataset_info, unified=UnifiedSpec(rows=200, dim=8, default_probes=2),
                         optimizer=lambda p: torch.optim.Adam(p, lr=0.01))
    assert model.dnn.layers[0].in_features == 5 * 16 + 1  # 5 id features x 2 probes x 8 + 1 numeric
    L.Trainer(max_epochs=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(model, dm)
    scored = predict_split(model, dm.stream("test"))
    assert auc(scored["label"], scored["prob"]) > 0.7


def _worker(rank: int, world: int, rendezvous: str, data: str, out: str) -> None:
    from recsys.train.strategy import shard_model

    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dm = CTRDataModule(data)
    model = EmbeddingMLP(dm.dataset_info, unified=UnifiedSpec(rows=300, dim=8, num_tables=2, default_probes=2))
    stream = ParquetStream(data, "train", dm.vocab, batch_size=256, shuffle=True, rank=0, world_size=1)
    batches = [b for _, b in zip(range(3), stream, strict=False)]
    if world == 1:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        net = model
    else:
        net = shard_model(model, world, torch.device("cpu"), sharding_types={"pooled": "column_wise"}, sparse_optimizer="sgd", sparse_lr=0.1)
        optimizer = torch.optim.SGD([p for p in net.parameters() if not hasattr(p, "_in_backward_optimizers")], lr=0.1)
    from tests.train.test_strategy import train_shares

    losses = train_shares(net, optimizer, batches, rank, world)
    if rank == 0:
        np.save(out, np.array(losses))
    dist.destroy_process_group()


def test_unified_tables_shard_and_train_on_two_ranks(tiny_dataset: Path, tmp_path: Path) -> None:
    from tests.train.test_strategy import spawn_ranks

    runs = {}
    for world in (1, 2):
        out = str(tmp_path / f"w{world}.npy")
        spawn_ranks(_worker, world, str(tiny_dataset), out)
        runs[world] = np.load(out)
    np.testing.assert_allclose(runs[2], runs[1], atol=2e-5)
    assert runs[1][-1] != runs[1][0]


def test_spec_is_validated() -> None:
    with pytest.raises(ValueError, match="unified.rows must be positive"):
        UnifiedSpec(rows=0)
    with pytest.raises(ValueError, match="unified.probes must be positive"):
        UnifiedSpec(rows=5, probes={"a": 0})


def test_hashing_trick_gives_each_feature_its_own_table() -> None:
    module = UnifiedEmbeddingBag(OWNERS, UnifiedSpec(rows=20, dim=4, shared=False), "sum")
    names = {c.name: c.feature_names for c in module.tables.embedding_bag_configs()}
    assert names == {"hashed_item": ["item@0", "hist_item@0"], "hashed_user": ["user@0"]}
    assert module.num_parameters == 2 * 20 * 4
    assert module(_kjt()).to_dict()["user"].shape == (3, 4)
