"""The embedding layer against plain references: table layout, pooled and jagged outputs of every
kind, the id guard, and mini-batch aware regularization from train counts."""

from pathlib import Path

import numpy as np
import pytest
import torch

from recsys.data.batch import Batch, make_kjt
from recsys.data.datamodule import CTRDataModule
from recsys.data.vocab import DatasetInfo
from recsys.embedding.hashing import MASK64, feature_salt, hash64_reference
from recsys.embedding.layer import EmbeddingLayer
from recsys.models.base import EmbeddingMLP
from tests.conftest import TINY_SCHEMA, write_dataset


@pytest.fixture
def dm(tiny_dataset: Path) -> CTRDataModule:
    return CTRDataModule(str(tiny_dataset), batch_size=64)


def _info(dm: CTRDataModule) -> DatasetInfo:
    return DatasetInfo.from_any(dm.dataset_info)


def _batch() -> Batch:
    """Three rows by hand: item 5 twice, a history with an empty row, tags of varying length."""
    sparse = make_kjt(
        {
            "user": (np.array([1, 2, 1]), np.array([1, 1, 1])),
            "item": (np.array([5, 7, 5]), np.array([1, 1, 1])),
            "tags": (np.array([1, 2, 3]), np.array([2, 0, 1])),
            "city": (np.array([0, 3, 7]), np.array([1, 1, 1])),
        }
    )
    sequences = make_kjt({"hist_item": (np.array([7, 5, 1, 2]), np.array([2, 0, 2]))})
    return Batch(torch.zeros(3, 1), sparse, sequences, torch.tensor([0.0, 1.0, 1.0]), torch.tensor([1, 2, 1]))


def _hash_row(value: int, owner: str, probe: int, rows: int) -> int:
    """The hashing transform written out on Python ints (not the torch code under test)."""
    return (hash64_reference(value & MASK64, feature_salt(owner, probe)) >> 1) % rows


def _bags(ids: list[int], lengths: list[int]) -> list[list[int]]:
    out, start = [], 0
    for n in lengths:
        out.append(ids[start : start + n])
        start += n
    return out


def _reference(layer: EmbeddingLayer, feature: str, bag: list[int], pooling: str) -> torch.Tensor:
    """One bag's embedding by hand: each probe's rows gathered from the weight, pooled, probes concatenated."""
    plan = layer.plans[layer.owner[feature]]
    parts = []
    for probe in range(plan.probes):
        lookup = layer.lookups[feature][probe]
        weight = layer.table_weight(lookup.table).detach()
        rows = [_hash_row(v, plan.owner, probe, plan.hash_rows) if plan.hash_rows else v for v in bag]
        if not rows:
            parts.append(torch.zeros(plan.dim))
            continue
        stacked = weight[rows]
        parts.append(stacked.sum(0) if pooling == "sum" else stacked.mean(0))
    return torch.cat(parts)


def test_plain_tables_sequences_share_their_target_and_the_schema_width_wins(tmp_path: Path) -> None:
    data = write_dataset(
        tmp_path / "d",
        schema=TINY_SCHEMA.replace(
            "{name: user, type: categorical}", "{name: user, type: categorical, embedding_dim: 4}"
        ),
    )
    layer = EmbeddingLayer(_info(CTRDataModule(str(data))), {"dim": 8})
    configs = {c.name: (c.feature_names, c.num_embeddings, c.embedding_dim) for c in layer.bags.embedding_bag_configs()}
    assert configs["t_item"][0] == ["item", "hist_item"]  # the sequence reads its target's table
    assert configs["t_city"][1] == 8  # 7 hash buckets + the null/OOV row
    assert configs["t_user"][2] == 4 and configs["t_item"][2] == 8
    assert layer.output_dims() == {"user": 4, "item": 8, "tags": 8, "city": 8, "hist_item": 8}


KINDS = {
    "plain": {"dim": 4},
    "hashed": {"kind": "hashed", "dim": 4, "rows": 5, "probes": 2},
    "unified": {
        "kind": "unified",
        "dim": 4,
        "rows": 9,
        "probes": 2,
        "num_tables": 2,
        "features": {"user": {"probes": 3}},
    },
}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("pooling", ["sum", "mean"])
@pytest.mark.parametrize("jagged", [(), ("item", "hist_item")])
def test_outputs_match_a_gather_and_pool_reference(dm: CTRDataModule, kind: str, pooling: str, jagged: tuple) -> None:
    torch.manual_seed(0)
    layer = EmbeddingLayer(_info(dm), KINDS[kind] | {"pooling": pooling}, jagged=jagged)
    out = layer(_batch())
    batch = _batch()
    features = batch.sparse.to_dict() | batch.sequences.to_dict()
    for f, jt in features.items():
        bags = _bags(jt.values().tolist(), jt.lengths().tolist())
        if f in jagged:  # one row per id, in order
            expected = torch.stack([_reference(layer, f, [v], "sum") for bag in bags for v in bag])
            torch.testing.assert_close(out.jagged[f].values(), expected)
            assert out.jagged[f].lengths().tolist() == jt.lengths().tolist()
        else:
            torch.testing.assert_close(out.pooled[f], torch.stack([_reference(layer, f, b, pooling) for b in bags]))
        assert (out.pooled[f] if f in out.pooled else out.jagged[f].values()).shape[1] == layer.output_dims()[f]


@pytest.mark.parametrize("kind", ["plain", "hashed", "unified"])
def test_rows_read_one_by_one_get_the_gradients_of_their_reads(dm: CTRDataModule, kind: str) -> None:
    """Jagged features are read row by row (unsharded: index_select on the torchrec table's weight):
    each table row's gradient is the sum of the upstream gradients of every read of it (a plain loop)."""
    torch.manual_seed(0)
    layer = EmbeddingLayer(_info(dm), KINDS[kind], jagged=("item", "hist_item")).train()
    out = layer(_batch())
    upstream = {f: torch.randn_like(out.jagged[f].values()) for f in ("item", "hist_item")}
    sum((out.jagged[f].values() * g).sum() for f, g in upstream.items()).backward()
    batch = _batch()
    features = batch.sparse.to_dict() | batch.sequences.to_dict()
    plan = layer.plans[layer.owner["item"]]
    expected: dict[str, torch.Tensor] = {}
    for f, g in upstream.items():
        for probe, lookup in enumerate(layer.lookups[f]):
            weight = layer.table_weight(lookup.table)
            grad = expected.setdefault(lookup.table, torch.zeros_like(weight))
            for i, v in enumerate(features[f].values().tolist()):
                row = _hash_row(v, plan.owner, probe, plan.hash_rows) if plan.hash_rows else v
                grad[row] += g[i, probe * plan.dim : (probe + 1) * plan.dim]
    for table, grad in expected.items():
        torch.testing.assert_close(layer.table_weight(table).grad, grad)


def test_unified_layout_salts_and_shared_rows(dm: CTRDataModule) -> None:
    layer = EmbeddingLayer(_info(dm), KINDS["unified"])
    names = {c.name: c.feature_names for c in layer.bags.embedding_bag_configs()}
    assert names == {
        "unified_0": ["user@0", "user@2", "item@0", "tags@0", "city@0", "hist_item@0"],
        "unified_1": ["user@1", "item@1", "tags@1", "city@1", "hist_item@1"],
    }
    assert layer.output_dims() == {"user": 12, "item": 8, "tags": 8, "city": 8, "hist_item": 8}
    # id 5 as a user and as an item lands in different rows; a sequence probes with its target's salts
    assert _hash_row(5, "user", 0, 9) != _hash_row(5, "item", 0, 9)
    hashed = EmbeddingLayer(_info(dm), KINDS["hashed"])
    assert {c.name for c in hashed.bags.embedding_bag_configs()} == {"h_user", "h_item", "h_tags", "h_city"}


def test_a_shared_table_read_row_by_row_takes_its_pooled_readers_along(dm: CTRDataModule) -> None:
    layer = EmbeddingLayer(
        _info(dm),
        {"kind": "unified", "dim": 4, "rows": 9, "features": {"city": {"kind": "plain"}}},
        jagged=["item", "hist_item"],
    )
    assert layer.bags is not None and [c.name for c in layer.bags.embedding_bag_configs()] == ["t_city"]
    assert {c.name for c in layer.rows["d4"].embedding_configs()} == {"unified_0"}
    assert set(layer(_batch()).pooled) == {"user", "tags", "city"}


def test_guard_stops_out_of_range_ids_before_any_kernel(dm: CTRDataModule, monkeypatch: pytest.MonkeyPatch) -> None:
    model = EmbeddingMLP(dm.dataset_info, embedding={"dim": 4})
    rows = model.info.num_embeddings["item"]
    calls = []
    monkeypatch.setattr(model.embedding.bags, "forward", lambda kjt: calls.append(kjt))
    for bad, feature, limit in ((rows, "item", rows), (-1, "item", rows), (8, "city", 8)):
        batch = _batch()
        values = {k: (v.values().numpy().copy(), v.lengths().numpy()) for k, v in batch.sparse.to_dict().items()}
        values[feature][0][1] = bad
        broken = Batch(batch.dense, make_kjt(values), batch.sequences, batch.labels, batch.groups)
        with pytest.raises(IndexError, match=f"feature '{feature}': id {bad} outside its table of {limit} rows"):
            model(broken)
    assert calls == []  # the embedding kernel was never called


def _mba_reference(layer: EmbeddingLayer, batch: Batch, counts: dict, lam: float) -> tuple[float, dict]:
    """λ Σ_j ||w_j||² / n_j by hand, and {table: {row: n_j}} of the rows the batch reads one by one
    (single-valued pooled features and every jagged row; pooled multi-hot lists are not rows)."""
    touched: dict[str, set[int]] = {}
    features = batch.sparse.to_dict() | batch.sequences.to_dict()
    for f, jt in features.items():
        if f not in ("user", "item", "city") and f not in layer.jagged_features:  # tags, hist_item: pooled lists
            continue
        owner, plan = layer.owner[f], layer.plans[layer.owner[f]]
        for probe, lookup in enumerate(layer.lookups[f]):
            for v in jt.values().tolist():
                touched.setdefault(lookup.table, set()).add(
                    _hash_row(v, owner, probe, plan.hash_rows) if plan.hash_rows else v
                )
    value, n_of = 0.0, {}
    for table, rows in touched.items():
        weight = layer.table_weight(table).detach()
        n_of[table] = {}
        for row in rows:
            n = 0  # train occurrences of every (owner, probe, id) that lands in this row
            for lookup in layer.all_lookups:
                if lookup.table != table or lookup.feature != lookup.owner:
                    continue
                plan = layer.plans[lookup.owner]
                for v, c in enumerate(counts[lookup.owner].tolist()):
                    if (_hash_row(v, lookup.owner, lookup.probe, plan.hash_rows) if plan.hash_rows else v) == row:
                        n += c
            n_of[table][row] = max(n, 1)
            value += lam * float(weight[row].pow(2).sum()) / n_of[table][row]
    return value, n_of


@pytest.mark.parametrize("kind", list(KINDS))
def test_mba_penalty_is_the_formula_over_the_rows_a_batch_reads(dm: CTRDataModule, kind: str) -> None:
    """λ Σ_j ||w_j||² / n_j over the distinct table rows the batch reads one by one, n_j = the train count
    of every id hashing into row j; its gradient is 2λ w_j / n_j on exactly those rows."""
    torch.manual_seed(0)
    lam = 0.5
    layer = EmbeddingLayer(
        _info(dm), KINDS[kind], jagged=["item", "hist_item"], mba_lambda=lam, resources=dm.resources
    ).train()
    batch = _batch()
    layer(batch)
    penalty = layer.regularization()
    expected, n_of = _mba_reference(layer, batch, dm.vocab.counts, lam)
    assert float(penalty) == pytest.approx(expected, rel=1e-5)
    penalty.backward()
    for table, rows in n_of.items():
        weight = layer.table_weight(table)
        reference = torch.zeros_like(weight)
        for row, n in rows.items():
            reference[row] = 2 * lam * weight[row].detach() / n
        torch.testing.assert_close(weight.grad, reference, atol=1e-7, rtol=1e-5)


def test_training_step_adds_the_penalty_to_the_data_loss(dm: CTRDataModule) -> None:
    torch.manual_seed(0)
    model = EmbeddingMLP(dm.dataset_info, embedding={"dim": 4}, mba_lambda=0.25, resources=dm.resources).train()
    batch = _batch()
    data_term = float(model.training_loss(batch))
    model.embedding.regularization()  # (that forward's terms, dropped)
    total = float(model.training_step(batch, 0))
    expected, _ = _mba_reference(model.embedding, batch, dm.vocab.counts, 0.25)
    assert total - data_term == pytest.approx(expected, rel=1e-4) and expected > 0
