"""OptEmbed inside the embedding layer: masks, sampled widths, search, compact tables, the 3-stage command."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recsys.commands.optembed import main as optembed_main
from recsys.data.batch import Batch, make_kjt
from recsys.data.datamodule import CTRDataModule
from recsys.data.resources import Resources
from recsys.data.vocab import DatasetInfo
from recsys.embedding.layer import EmbeddingLayer
from recsys.embedding.optembed import (
    compact_remap,
    prefix_mask,
    remap_ids,
    sample_dims,
    sparsity,
    step_ste,
)
from recsys.train.checkpoint import load_model
from recsys.train.optembed import Search, SearchConfig
from tests.conftest import ROOT, write_dataset


def _batch(positions: torch.Tensor | None = None) -> Batch:
    sparse = make_kjt(
        {
            "user": (np.array([1, 2, 3]), np.array([1, 1, 1])),
            "item": (np.array([4, 5, 6]), np.array([1, 1, 1])),
            "tags": (np.array([1, 2]), np.array([1, 0, 1])),
            "city": (np.array([1, 2, 3]), np.array([1, 1, 1])),
        }
    )
    sequences = make_kjt({"hist_item": (np.array([1, 4, 7, 11, 0]), np.array([2, 0, 3]))})
    return Batch(torch.zeros(3, 1), sparse, sequences, torch.zeros(3), torch.zeros(3), positions=positions)


def _supernet(tiny_dataset: Path, **block) -> EmbeddingLayer:
    info = DatasetInfo.from_any(CTRDataModule(str(tiny_dataset)).dataset_info)
    return EmbeddingLayer(info, {"kind": "optembed", "dim": 4} | block, jagged=("item", "hist_item"))


def test_step_ste_forward_and_official_backward() -> None:
    x = torch.tensor([-1.5, -0.8, -0.3, 0.0, 0.2, 0.5, 1.2], requires_grad=True)
    y = step_ste(x)
    assert y.tolist() == [0, 0, 0, 0, 1, 1, 1]
    y.backward(torch.full_like(x, 2.0))
    expected = 2.0 * torch.tensor([0.0, 0.4, 2 - 4 * 0.3, 2.0, 2 - 4 * 0.2, 0.4, 0.0])
    torch.testing.assert_close(x.grad, expected)


def test_threshold_regularizer_value_and_gradient(tiny_dataset: Path) -> None:
    layer = _supernet(tiny_dataset, alpha=0.3)
    t = torch.tensor([0.5, -1.0, 0.0, 2.0])
    with torch.no_grad():
        layer.optembed.threshold.copy_(t)
    reg = layer.regularization()
    torch.testing.assert_close(reg, (0.3 * np.exp(-t.numpy()).sum()).astype(np.float32) * torch.ones(()))
    reg.backward()
    torch.testing.assert_close(layer.optembed.threshold.grad, -0.3 * torch.exp(-t))


def test_masks_apply_to_rows_before_pooling_against_a_plain_reference(tiny_dataset: Path) -> None:
    torch.manual_seed(0)
    layer = _supernet(tiny_dataset).eval()
    with torch.no_grad():
        for o in layer.optembed.owners:
            layer.table_weight(f"t_{o}").normal_()
        layer.optembed.threshold.copy_(torch.tensor([2.5, 3.0, 2.0, 2.8]))
    dims = {"user": 3, "item": 2, "tags": 1, "city": 4}
    layer.set_eval_dims(dims)
    out = layer(_batch())
    # reference: loops over bags; a row is zero when its L1 norm is at most its table's threshold
    batch = _batch()
    for feature, jagged in (batch.sparse.to_dict() | batch.sequences.to_dict()).items():
        owner = layer.owner[feature]
        weight = layer.table_weight(f"t_{owner}").detach()
        t = float(layer.optembed.threshold[layer.optembed.index[owner]])
        ids, start = jagged.values().tolist(), 0
        rows_out = []
        for n in jagged.lengths().tolist():
            rows = [weight[i] if float(weight[i].abs().sum()) > t else torch.zeros(4) for i in ids[start : start + n]]
            start += n
            rows = [torch.cat([r[: dims[owner]], torch.zeros(4 - dims[owner])]) for r in rows]
            rows_out.append(rows)
        if feature in layer.jagged_features:
            torch.testing.assert_close(
                out.jagged[feature].values(), torch.stack([r for rows in rows_out for r in rows])
            )
        else:
            expected = torch.stack([torch.stack(r).mean(0) if r else torch.zeros(4) for r in rows_out])
            torch.testing.assert_close(out.pooled[feature], expected)
    masks = layer.row_masks()
    assert 0 < int(masks["item"].sum()) < masks["item"].numel()  # the thresholds prune some rows, not all


def test_sampled_widths_are_uniform_per_position_and_prefix_masks_exact() -> None:
    full = torch.tensor([8, 4, 16])
    positions = torch.arange(30_000)
    dims = sample_dims(positions, 30_000, full, step=3)
    assert dims.shape == (30_000, 3)
    for t, d in enumerate(full.tolist()):
        freq = torch.bincount(dims[:, t], minlength=d + 1)[1:].float() / 30_000
        assert int(dims[:, t].min()) == 1 and int(dims[:, t].max()) == d
        assert torch.all((freq - 1 / d).abs() < 0.012), freq
    # a sample's draw depends on its position and the step, not on the batch it is in
    assert torch.equal(sample_dims(positions[100:200], 100, full, 3), dims[100:200])
    assert not torch.equal(sample_dims(positions[:100], 100, full, 4), dims[:100])
    assert prefix_mask(torch.tensor([1, 3]), 4).tolist() == [[1, 0, 0, 0], [1, 1, 1, 0]]


def test_training_draws_a_width_per_sample_and_table_shared_by_a_sequence_and_its_target(tiny_dataset: Path) -> None:
    layer = _supernet(tiny_dataset, dim=16, prune_rows=False).train()
    with torch.no_grad():
        for o in layer.optembed.owners:
            layer.table_weight(f"t_{o}").fill_(1.0)
    out = layer(_batch(positions=torch.tensor([10, 11, 12])))
    widths = (out.pooled["user"] != 0).sum(1)
    assert torch.all(out.pooled["user"][:, 0] == 1) and len(set(widths.tolist())) > 1  # prefixes of random widths
    item = (out.jagged["item"].values() != 0).sum(1).tolist()
    history = (out.jagged["hist_item"].values() != 0).sum(1).tolist()
    assert history == [item[0], item[0], item[2], item[2], item[2]]  # rows 0 and 2 (row 1 has no history)


def test_remap_ids_and_sparsity_formula() -> None:
    kept = torch.tensor([True, False, True, True, False])
    remap = compact_remap(kept)
    assert remap.tolist() == [1, 0, 2, 3, 0]
    kjt = make_kjt({"a": (np.array([0, 1, 4, 3]), np.array([2, 2])), "b": (np.array([2]), np.array([1, 0]))})
    out = remap_ids(kjt, {"a": remap, "b": remap}).to_dict()
    assert out["a"].values().tolist() == [1, 0, 0, 3] and out["a"].lengths().tolist() == [2, 2]
    assert out["b"].values().tolist() == [2]
    # 1 - (3·4 + 10·2) / (5·16 + 20·8)
    assert sparsity({"x": 3, "y": 10}, {"x": 4, "y": 2}, {"x": 5, "y": 20}, {"x": 16, "y": 8}) == pytest.approx(
        1 - 32 / 240
    )


def test_search_is_deterministic_respects_the_budget_and_crosses_over_tables() -> None:
    kept, rows = np.array([100, 5, 40, 1]), np.array([120, 5, 60, 3])
    target = np.array([3, 8, 5, 1])

    def fitness(dims: np.ndarray) -> float:
        return -float(np.abs(dims - target).sum())

    config = SearchConfig(population=10, generations=8, budget=0.5, seed=4)
    full = np.full(4, 8)
    first, second = Search(kept, rows, full, config), Search(kept, rows, full, config)
    best1, _ = first.run(fitness, progress=False)
    best2, _ = second.run(fitness, progress=False)
    assert np.array_equal(best1, best2) and list(first.scored.items()) == list(second.scored.items())
    limit = 0.5 * rows.sum() * 8
    assert all(first.params(np.array(d)) <= limit for d in first.scored)
    assert {x for d in first.scored for x in d} <= {4, 8}  # multiples of dim_step (4)
    fine = Search(kept, rows, full, SearchConfig(population=10, generations=8, budget=0.5, seed=4, dim_step=1))
    fine.run(fitness, progress=False)
    assert len({x for d in fine.scored for x in d}) > 2
    third = Search(kept, rows, full, SearchConfig(population=10, generations=8, budget=0.5, seed=5))
    third.run(fitness, progress=False)
    assert list(third.scored) != list(first.scored)  # the seed matters (the order candidates were drawn)
    with pytest.raises(ValueError, match="narrowest candidate"):
        Search(kept, rows, full, SearchConfig(budget=0.3))
    a, b = np.array([1, 2, 3, 4]), np.array([5, 6, 7, 8])
    child = Search(kept, rows, full, SearchConfig(seed=0)).crossover(a, b)
    assert all(c in (x, y) for c, x, y in zip(child, a, b, strict=True))
    front = first.pareto()
    assert [p for p, _, _ in front] == sorted(p for p, _, _ in front)
    assert all(s1 < s2 for (_, s1, _), (_, s2, _) in zip(front, front[1:], strict=False))


class _Artifact(Resources):
    def __init__(self, result: dict) -> None:
        self.result = result

    def optembed_result(self, artifact: str) -> dict:
        return self.result


def test_compact_tables_give_exactly_the_narrowed_supernet_outputs(tiny_dataset: Path) -> None:
    torch.manual_seed(0)
    supernet = _supernet(tiny_dataset, dim=8).eval()
    with torch.no_grad():
        for o in supernet.optembed.owners:
            supernet.table_weight(f"t_{o}").normal_()
        supernet.optembed.threshold.fill_(6.0)
    masks = supernet.row_masks()
    dims = {o: 4 * (i % 2 + 1) for i, o in enumerate(supernet.optembed.owners)}
    info = DatasetInfo.from_any(CTRDataModule(str(tiny_dataset)).dataset_info)
    compact = EmbeddingLayer(
        info,
        {"kind": "optembed", "stage": "compact", "artifact": "search", "dim": 8},
        jagged=("item", "hist_item"),
        resources=_Artifact({"dims": dims, "kept": masks}),
    ).eval()
    with torch.no_grad():  # the kept rows' first dims columns, in order, after the zero row
        for o, mask in masks.items():
            compact.table_weight(f"t_{o}")[1:] = supernet.table_weight(f"t_{o}")[mask][:, : dims[o]]
    supernet.set_eval_dims(dims)
    wide, narrow = supernet(_batch()), compact(_batch())
    for f in narrow.pooled:
        d = dims[supernet.owner[f]]
        torch.testing.assert_close(narrow.pooled[f], wide.pooled[f][:, :d])
        assert float(wide.pooled[f][:, d:].abs().sum()) == 0
    for f in narrow.jagged:
        torch.testing.assert_close(narrow.jagged[f].values(), wide.jagged[f].values()[:, : dims[supernet.owner[f]]])
    kept_rows = {o: int(m.sum()) for o, m in masks.items()}
    assert 0 < sum(kept_rows.values()) < sum(m.numel() for m in masks.values())
    assert {o: p.rows for o, p in compact.plans.items()} == {o: k + 1 for o, k in kept_rows.items()}
    assert compact.spec.dims == dims and compact.spec.kept_rows == kept_rows  # into the hparams: no artifact to reload
    # a pruned id reads the zero row, and the zero row gets no gradient
    compact.train()
    sum(v.sum() for v in compact(_batch()).pooled.values()).backward()
    for o in dims:
        weight = compact.table_weight(f"t_{o}")
        assert weight.grad is None or float(weight.grad[0].abs().sum()) == 0.0
        assert float(weight[0].abs().sum()) == 0.0


def test_three_stages_in_one_command_and_a_compact_checkpoint_loads_without_the_artifact(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "tiny")
    out = tmp_path / "optembed"
    head = [
        "run",
        "--config",
        str(ROOT / "configs/movielens/din.yaml"),
        "--config",
        str(ROOT / "configs/embedding/optembed_supernet.yaml"),
        "--out",
        str(out),
        "--population",
        "8",
        "--generations",
        "3",
    ]
    tail = [
        "--",
        "--data.path",
        str(data),
        "--trainer.max_epochs",
        "2",
        "--data.batch_size",
        "256",
        "--model.init_args.mba_lambda",
        "0",
    ]
    args = head + tail
    assert optembed_main(args) == 0
    result = json.loads((out / "result.json").read_text())
    search_dir = Path(result["search"])
    assert result["sparsity"] >= 0.5 and (search_dir / "pareto.png").exists()  # the overlay's budget 0.5
    assert (search_dir / "pareto.csv").read_text().startswith("params,fraction_of_full,val_auc")
    assert 0.5 < result["test_auc"] <= 1
    # the search scores widths on val only: on a copy whose test clicks are shuffled it finds the same
    permuted = tmp_path / "test_labels_permuted"
    shutil.copytree(data, permuted)
    for file in sorted((permuted / "test").glob("*.parquet")):
        table = pq.read_table(file)
        clicks = np.random.default_rng(0).permutation(table.column("click").to_numpy())
        pq.write_table(table.set_column(table.schema.get_field_index("click"), "click", pa.array(clicks)), file)
    again = tmp_path / "search_again"
    first = json.loads((search_dir / "search.json").read_text())
    flags = ["--data", str(permuted), "--out", str(again), "--budget", "0.5", *head[-4:]]
    assert optembed_main(["search", "--ckpt", first["supernet"], *flags]) == 0
    second = json.loads((again / "search.json").read_text())
    assert (second["dims"], second["val_auc"]) == (first["dims"], first["val_auc"])
    stages = {"supernet": out / "supernet", "search": search_dir, "compact": out / "compact"}
    marks = {p: (d / "FINGERPRINT").stat().st_mtime_ns for p, d in stages.items()}
    assert optembed_main(args) == 0  # the same command again: every stage is recorded as done
    assert marks == {p: (d / "FINGERPRINT").stat().st_mtime_ns for p, d in stages.items()}
    assert optembed_main([*head, "--budget", "0.6", *tail]) == 0  # another budget: search + compact rerun
    assert marks["supernet"] == (out / "supernet" / "FINGERPRINT").stat().st_mtime_ns
    second = Path(json.loads((out / "result.json").read_text())["search"])
    assert second != search_dir and (search_dir / "optembed.pt").exists()  # the first search is still there
    shutil.rmtree(search_dir)
    found = json.loads((out / "result.json").read_text())
    model = load_model(found["checkpoint"])
    assert model.embedding.spec.dims == found["dims"] and model.embedding.spec.kept_rows == found["kept_rows"]
    batch = next(iter(CTRDataModule(str(data)).stream("test")))
    assert torch.isfinite(model(batch)).all()
    bad = [
        "run",
        "--config",
        str(ROOT / "configs/movielens/din.yaml"),
        "--out",
        str(tmp_path / "x"),
        "--",
        "--data.path",
        str(data),
    ]
    assert optembed_main(bad) == 2  # no supernet block: refused before any training
