import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from recsys.data.batch import make_kjt
from recsys.data.datamodule import CTRDataModule
from recsys.embedding.optembed import (
    OptEmbedBag,
    OptEmbedSpec,
    compact_remap,
    prefix_mask,
    remap_ids,
    sample_dims,
    sparsity,
    step_ste,
)
from recsys.models.base import EmbeddingMLP
from recsys.train.module import load_model
from recsys.train.optembed import Search, SearchConfig
from recsys.train.optembed import main as optembed_main
from tests.conftest import ROOT, write_dataset

OWNERS = {"user": "user", "item": "item", "hist_item": "item"}
ROWS = {"user": 10, "item": 12}


def _kjt():
    return make_kjt({
        "user": (np.array([1, 2, 3]), np.array([1, 1, 1])),
        "item": (np.array([4, 5, 6]), np.array([1, 1, 1])),
        "hist_item": (np.array([1, 4, 7, 11, 0]), np.array([2, 0, 3])),
    })


def test_step_ste_forward_and_official_backward() -> None:
    x = torch.tensor([-1.5, -0.8, -0.3, 0.0, 0.2, 0.5, 1.2], requires_grad=True)
    y = step_ste(x)
    assert y.tolist() == [0, 0, 0, 0, 1, 1, 1]
    y.backward(torch.full_like(x, 2.0))
    expected = 2.0 * torch.tensor([0.0, 0.4, 2 - 4 * 0.3, 2.0, 2 - 4 * 0.2, 0.4, 0.0])
    torch.testing.assert_close(x.grad, expected)


def test_threshold_regularizer_value_and_gradient() -> None:
    bag = OptEmbedBag(OWNERS, ROWS, 4, "sum", OptEmbedSpec(alpha=0.3))
    with torch.no_grad():
        bag.threshold.copy_(torch.tensor([0.5, -1.0]))
    reg = bag.regularization()
    torch.testing.assert_close(reg, torch.tensor(0.3 * (np.exp(-0.5) + np.exp(1.0)), dtype=torch.float32))
    reg.backward()
    torch.testing.assert_close(bag.threshold.grad, -0.3 * torch.exp(-torch.tensor([0.5, -1.0])))


def test_masks_apply_to_rows_before_pooling_against_a_plain_reference() -> None:
    torch.manual_seed(0)
    bag = OptEmbedBag(OWNERS, ROWS, 4, "mean", OptEmbedSpec()).eval()
    with torch.no_grad():
        for o in ("user", "item"):
            bag.weight(o).normal_()
        bag.threshold.copy_(torch.tensor([2.5, 3.0]))
    dims = {"user": 3, "item": 2}
    bag.set_eval_dims(dims)
    out = bag(_kjt()).to_dict()
    # reference: python loops over bags, a row counts as zero when its L1 norm is under the threshold
    kjt = _kjt().to_dict()
    for feature, jagged in kjt.items():
        owner = OWNERS[feature]
        weight, t = bag.weight(owner).detach(), float(bag.threshold[bag.index[owner]])
        ids = jagged.values().tolist()
        start = 0
        for b, n in enumerate(jagged.lengths().tolist()):
            rows = [weight[i] if float(weight[i].abs().sum()) > t else torch.zeros(4) for i in ids[start:start + n]]
            start += n
            expected = torch.stack(rows).mean(0) if rows else torch.zeros(4)
            expected[dims[owner]:] = 0
            torch.testing.assert_close(out[feature][b], expected)
    masks = bag.row_masks()
    assert 0 < int(masks["item"].sum()) < 12  # the thresholds prune some rows, not all


def test_sampled_dims_are_uniform_and_prefix_masks_exact() -> None:
    torch.manual_seed(0)
    dims = sample_dims(40_000, 3, 8)
    assert dims.shape == (40_000, 3) and int(dims.min()) == 1 and int(dims.max()) == 8
    freq = torch.bincount(dims.flatten(), minlength=9)[1:].float() / dims.numel()
    assert torch.all((freq - 1 / 8).abs() < 0.01), freq
    mask = prefix_mask(torch.tensor([[1, 3]]), 4)
    assert mask.tolist() == [[[1, 0, 0, 0], [1, 1, 1, 0]]]


def test_training_samples_a_dim_per_sample_and_table() -> None:
    torch.manual_seed(1)
    bag = OptEmbedBag(OWNERS, ROWS, 16, "sum", OptEmbedSpec(prune_rows=False)).train()
    with torch.no_grad():
        bag.weight("user").fill_(1.0)
        bag.weight("item").fill_(1.0)
    out = bag(_kjt()).to_dict()
    widths = (out["user"] != 0).sum(1)
    assert torch.all(out["user"][:, 0] == 1) and len(set(widths.tolist())) > 1  # prefixes of random widths
    # a sample's sequence and target share their table's draw (sample 1 has an empty sequence)
    for b in (0, 2):
        assert int((out["hist_item"][b] != 0).sum()) == int((out["item"][b] != 0).sum())


def test_remap_ids_and_sparsity_formula() -> None:
    kept = torch.tensor([True, False, True, True, False])
    remap = compact_remap(kept)
    assert remap.tolist() == [1, 0, 2, 3, 0]
    kjt = make_kjt({"a": (np.array([0, 1, 4, 3]), np.array([2, 2])), "b": (np.array([2]), np.array([1, 0]))})
    out = remap_ids(kjt, {"a": remap, "b": remap}).to_dict()
    assert out["a"].values().tolist() == [1, 0, 0, 3] and out["a"].lengths().tolist() == [2, 2]
    assert out["b"].values().tolist() == [2]
    # 1 - (3·4 + 10·2) / (5·16 + 20·16)
    assert sparsity({"x": 3, "y": 10}, {"x": 4, "y": 2}, {"x": 5, "y": 20}, 16) == pytest.approx(1 - 32 / 400)


def test_search_is_deterministic_respects_the_budget_and_crosses_over_tables() -> None:
    kept, rows = np.array([100, 5, 40, 1]), np.array([120, 5, 60, 3])
    target = np.array([3, 8, 5, 1])

    def fitness(dims: np.ndarray) -> float:
        return -float(np.abs(dims - target).sum())

    config = SearchConfig(population=10, generations=8, budget=0.5, seed=4)
    first, second = Search(kept, rows, 8, config), Search(kept, rows, 8, config)
    best1, _ = first.run(fitness, progress=False)
    best2, _ = second.run(fitness, progress=False)
    assert np.array_equal(best1, best2) and list(first.scored.items()) == list(second.scored.items())
    limit = 0.5 * rows.sum() * 8
    assert all(first.params(np.array(d)) <= limit for d in first.scored)
    assert {x for d in first.scored for x in d} <= {4, 8}  # multiples of dim_step (4)
    fine = Search(kept, rows, 8, SearchConfig(population=10, generations=8, budget=0.5, seed=4, dim_step=1))
    fine.run(fitness, progress=False)
    assert len({x for d in fine.scored for x in d}) > 2
    third = Search(kept, rows, 8, SearchConfig(population=10, generations=8, budget=0.5, seed=5))
    third.run(fitness, progress=False)
    assert list(third.scored) != list(first.scored)  # the seed matters (the order candidates were drawn)
    with pytest.raises(ValueError, match="narrowest candidate"):
        Search(kept, rows, 8, SearchConfig(budget=0.3))
    a, b = np.array([1, 2, 3, 4]), np.array([5, 6, 7, 8])
    child = Search(kept, rows, 8, SearchConfig(seed=0)).crossover(a, b)
    assert all(c in (x, y) for c, x, y in zip(child, a, b, strict=True))
    front = first.pareto()
    assert [p for p, _, _ in front] == sorted(p for p, _, _ in front)
    assert all(s1 < s2 for (_, s1, _), (_, s2, _) in zip(front, front[1:], strict=False))


def test_compact_tables_predict_exactly_what_the_masked_supernet_does(tiny_dataset: Path) -> None:
    torch.manual_seed(0)
    dm = CTRDataModule(str(tiny_dataset), batch_size=256)
    supernet = EmbeddingMLP(dm.dataset_info, embedding_dim=8, dnn_hidden_units=[16], optembed=OptEmbedSpec()).eval()
    with torch.no_grad():
        for owner in supernet.tables.table_owners:
            supernet.tables.weight(owner).normal_()
        supernet.tables.threshold.fill_(6.0)
    masks = supernet.tables.row_masks()
    dims = {o: i % 8 + 1 for i, o in enumerate(supernet.tables.table_owners)}
    supernet.tables.set_eval_dims(dims)
    compact = supernet.to_compact({"dim": 8, "dims": dims, "kept": masks})
    batch = next(iter(dm.stream("val")))
    torch.testing.assert_close(compact(batch), supernet(batch), atol=1e-6, rtol=0)
    kept_rows = {o: int(m.sum()) for o, m in masks.items()}
    assert 0 < sum(kept_rows.values()) < sum(m.numel() for m in masks.values())
    assert compact.tables.num_parameters == sum((kept_rows[o] + 1) * dims[o] for o in dims)
    full = {o: m.numel() for o, m in masks.items()}
    assert sparsity(kept_rows, dims, full, 8) == pytest.approx(1 - (compact.tables.num_parameters - sum(dims.values())) / (8 * sum(full.values())))
    # a pruned id reads the zero row, and the zero row gets no gradient
    compact.train()
    compact(batch).sum().backward()
    for owner in dims:
        assert compact.tables.weight(owner).grad is None or float(compact.tables.weight(owner).grad[0].abs().sum()) == 0.0
        assert float(compact.tables.weight(owner)[0].abs().sum()) == 0.0


def test_three_stages_from_the_cli_and_a_compact_checkpoint_loads_without_the_artifact(tmp_path: Path) -> None:
    from recsys.train.cli import run

    data = write_dataset(tmp_path / "tiny")
    def fit(stage: str, *extra: str) -> None:
        run(["fit", "--config", str(ROOT / "configs/movielens/base.yaml"), "--config", str(ROOT / f"configs/movielens/optembed_{stage}.yaml"),
             "--data.path", str(data), "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
             "--model.init_args.embedding_dim", "8", "--data.batch_size", "256",
             "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.logger.init_args.name", stage, *extra])

    fit("supernet", "--model.init_args.optembed.alpha", "0.05", "--model.init_args.optembed.threshold_lr", "0.05")
    supernet = next((tmp_path / "runs").rglob("last.ckpt"))
    search_dir = tmp_path / "search"
    assert optembed_main(["search", "--ckpt", str(supernet), "--out", str(search_dir), "--budget", "0.5",
                          "--population", "8", "--generations", "3"]) == 0
    result = json.loads((search_dir / "search.json").read_text())
    assert result["sparsity"] >= 0.5 and (search_dir / "pareto.png").exists()
    assert (search_dir / "pareto.csv").read_text().startswith("params,fraction_of_full,val_auc")
    fit("retrain", "--model.init_args.optembed.artifact", str(search_dir))
    compact_ckpt = next((tmp_path / "runs" / "retrain").rglob("best.ckpt"))
    # warm start: the compact model starts as the supernet with the searched dims
    supernet_model = load_model(supernet)
    supernet_model.tables.set_eval_dims(result["dims"])
    warm = EmbeddingMLP(**{k: v for k, v in supernet_model.hparams.items() if not k.startswith("_")}
                        | {"optembed": OptEmbedSpec(stage="compact", artifact=str(search_dir), warm_start=True)}).eval()
    batch = next(iter(CTRDataModule(str(data)).stream("test")))
    torch.testing.assert_close(warm(batch), supernet_model(batch), atol=1e-6, rtol=0)
    shutil.rmtree(search_dir)
    model = load_model(compact_ckpt)
    assert model.tables.dims == result["dims"] and model.tables.kept_rows == result["kept_rows"]
    assert model.tables.num_parameters == result["params"] + sum(result["dims"].values())
    assert torch.isfinite(model(batch)).all()
