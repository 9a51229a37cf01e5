"""Sharded tables on real processes: 2 ranks on gloo (127.0.0.1) against 1 unsharded process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from recsys.data.batch import Batch
from recsys.data.datamodule import CTRDataModule
from recsys.data.parquet import ParquetStream
from recsys.models.din import DIN
from recsys.train.strategy import shard_model, table_parameters
from tests.conftest import ROOT, plain_ctr_metrics, write_dataset
from tests.ranks import file_rendezvous, share, spawn_ranks

STEPS = 4
GLOBAL_BATCH = 256


MBA = 0.05  # large enough that the penalty moves the rows visibly in 4 steps


def _build(data: str, dice_and_mba: bool = False) -> tuple[DIN, list[Batch], Batch]:
    torch.manual_seed(0)
    dm = CTRDataModule(data)
    if dice_and_mba:  # batch statistics (Dice) and the batch's row set (MBA) are per rank: half the global batch
        model = DIN(
            dm.dataset_info,
            embedding={"dim": 8},
            attention_activation="dice",
            dnn_activation="dice",
            mba_lambda=MBA,
            resources=dm.resources,
        )
    else:
        model = DIN(dm.dataset_info, embedding={"dim": 8}, attention_activation="prelu", dnn_activation="relu")
    stream = ParquetStream(data, "train", dm.vocab, batch_size=GLOBAL_BATCH, shuffle=True, rank=0, world_size=1)
    batches = [b for _, b in zip(range(STEPS), stream, strict=False)]
    val = next(iter(ParquetStream(data, "val", dm.vocab, batch_size=200, rank=0, world_size=1)))
    return model, batches, val


def train_shares(
    net: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[Batch], rank: int, world: int
) -> list[float]:
    """Trains on this rank's share of each global batch; returns the global mean loss per step."""
    losses = []
    for batch in batches:
        local = share(batch, rank, world)
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(net(local), local.labels)
        loss.backward()
        optimizer.step()
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item() / world)
    return losses


def _reference(data: str) -> tuple[list[float], np.ndarray]:
    """One unsharded process, plain SGD on every parameter."""
    model, batches, val = _build(data)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for batch in batches:
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(model(batch), batch.labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        return losses, torch.sigmoid(model.eval()(val)).numpy()


def _dice_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in model.named_buffers() if ".norm." in name}


def _train_counts(data: str, model: DIN) -> dict[str, torch.Tensor]:
    """n_j of MBA by a plain count: each table row's occurrences in the train split, at least 1; row 0
    (null / out of vocabulary) holds no vocabulary id, so it counts as seen once (docs/architecture.md)."""
    from recsys.data.arrow import split_files

    vocab = CTRDataModule(data).vocab
    train = pa.concat_tables([pq.read_table(f) for f in split_files(Path(data), "train")])
    counts = {}
    for table in ("user", "item", "city"):
        rows = torch.as_tensor(np.asarray(vocab.lookup(table, train.column(table).combine_chunks())))
        size = model.embedding.table_weight(f"t_{table}").shape[0]
        counts[table] = torch.bincount(rows, minlength=size)
        counts[table][0] = 0
        counts[table] = counts[table].clamp(min=1).float()
    return counts


def _share_penalty(model: DIN, local: Batch, counts: dict[str, torch.Tensor]) -> torch.Tensor:
    """λ Σ_j ||w_j||² / n_j over the distinct rows one share reads: the single-valued features and the
    behavior sequence (through the item table); the pooled tag list is a mean, not penalised."""
    penalty = torch.zeros(())
    for table in ("user", "item", "city"):
        ids = local.sparse[table].values()
        if table == "item":
            ids = torch.cat([ids, local.sequences["hist_item"].values()])
        unique = ids.unique()
        weight = model.embedding.table_weight(f"t_{table}")
        penalty = penalty + (weight[unique].pow(2).sum(1) / counts[table][unique]).sum()
    return MBA * penalty


def _reference_dice_and_mba(data: str, world: int = 2) -> tuple[list[float], np.ndarray]:
    """One process doing by hand what each of ``world`` ranks does: per step, each rank's share of the
    batch gets its own forward (Dice normalises by that share's statistics; MBA penalises the rows that
    share reads), the gradient is the mean over shares (DDP's averaging and torchrec's gradient
    division), and the Dice running statistics are rank 0's (they only ever saw its shares)."""
    model, batches, val = _build(data, dice_and_mba=True)
    counts = _train_counts(data, model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for batch in batches:
        optimizer.zero_grad()
        total = torch.zeros(())
        for rank in range(world):
            local = share(batch, rank, world)
            bce = F.binary_cross_entropy_with_logits(model(local), local.labels)
            total = total + (bce + _share_penalty(model, local, counts)) / world
            if rank == 0:
                rank0 = _dice_buffers(model)
        total.backward()
        with torch.no_grad():  # another rank's statistics never reach rank 0's running averages
            for name, buffer in model.named_buffers():
                if name in rank0:
                    buffer.copy_(rank0[name])
        optimizer.step()
        losses.append(float(total))
    with torch.no_grad():
        return losses, torch.sigmoid(model.eval()(val)).numpy()


def _dice_mba_worker(rank: int, world: int, rendezvous: str, data: str, out: str) -> None:
    """The model's own training loss (BCE + the layer's MBA from its lookups) on this rank's share."""
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, batches, val = _build(data, dice_and_mba=True)
    dmp = shard_model(
        model,
        world,
        torch.device("cpu"),
        sharding_types={"pooled": "table_wise"},
        sparse_optimizer="sgd",
        sparse_lr=0.1,
    )
    dense = torch.optim.SGD([p for p in dmp.parameters() if not hasattr(p, "_in_backward_optimizers")], lr=0.1)
    losses = []
    for batch in batches:
        local = share(batch, rank, world)
        dense.zero_grad()
        loss = F.binary_cross_entropy_with_logits(dmp(local), local.labels) + dmp.module.embedding.regularization()
        loss.backward()
        dense.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world)
    dmp.eval()
    with torch.no_grad():
        probs = torch.sigmoid(dmp(val)).numpy()
    if rank == 0:
        np.savez(out, losses=np.array(losses), probs=probs)
    dist.destroy_process_group()


def _sharded_worker(rank: int, world: int, rendezvous: str, data: str, sharding: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, batches, val = _build(data)
    dmp = shard_model(
        model, world, torch.device("cpu"), sharding_types={"pooled": sharding}, sparse_optimizer="sgd", sparse_lr=0.1
    )
    dense = [p for p in dmp.parameters() if not hasattr(p, "_in_backward_optimizers")]
    losses = train_shares(dmp, torch.optim.SGD(dense, lr=0.1), batches, rank, world)
    dmp.eval()
    with torch.no_grad():
        probs = torch.sigmoid(dmp(val)).numpy()  # every rank scores the same rows
        # an id past the end of its table stops the batch before the sharded lookup runs
        values = val.sparse["item"].values().clone()
        values[0] = model.info.num_embeddings["item"]
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        sparse = {k: v for k, v in val.sparse.to_dict().items()}
        sparse["item"] = type(sparse["item"])(values=values, lengths=sparse["item"].lengths())
        bad = Batch(val.dense, KeyedJaggedTensor.from_jt_dict(sparse), val.sequences, val.labels, val.groups)
        try:
            dmp(bad)
            refused = ""
        except IndexError as err:
            refused = str(err)
    if rank == 0:
        np.savez(out, losses=np.array(losses), probs=probs, plan=str(dmp.plan), refused=refused)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_dataset(tmp_path_factory.mktemp("shard") / "tiny"))


@pytest.mark.parametrize("sharding", ["table_wise", "column_wise", "data_parallel"])
def test_two_ranks_match_one_process(tiny: str, tmp_path: Path, sharding: str) -> None:
    ref_losses, ref_probs = _reference(tiny)
    out = str(tmp_path / "sharded.npz")
    spawn_ranks(_sharded_worker, 2, tiny, sharding, out)
    result = np.load(out)
    assert sharding in str(result["plan"]) and "row_wise" in str(result["plan"])  # sequences: row-wise
    np.testing.assert_allclose(result["losses"], ref_losses, rtol=0, atol=2e-5)
    np.testing.assert_allclose(result["probs"], ref_probs, rtol=0, atol=2e-5)
    assert ref_losses[-1] != ref_losses[0]  # it did train
    assert "feature 'item': id 61 outside its table of 61 rows" in str(result["refused"])


def test_two_ranks_with_dice_and_mba_match_a_per_share_reference(tiny: str, tmp_path: Path) -> None:
    ref_losses, ref_probs = _reference_dice_and_mba(tiny)
    out = str(tmp_path / "dice_mba.npz")
    spawn_ranks(_dice_mba_worker, 2, tiny, out)
    result = np.load(out)
    np.testing.assert_allclose(result["losses"], ref_losses, rtol=0, atol=2e-5)
    np.testing.assert_allclose(result["probs"], ref_probs, rtol=0, atol=2e-5)
    # the reference is not one process on the whole batch: that one differs (Dice statistics and row sets)
    model, batches, _ = _build(tiny, dice_and_mba=True)
    whole = F.binary_cross_entropy_with_logits(model(batches[0]), batches[0].labels)
    whole = whole + _share_penalty(model, batches[0], _train_counts(tiny, model))
    assert abs(float(whole) - ref_losses[0]) > 3 * 2e-5  # (7e-5 here): the tolerance above tells them apart


def test_tables_are_the_sparse_parameters(tiny: str) -> None:
    model, _, _ = _build(tiny)
    names = {n for n, p in model.named_parameters() if any(p is q for q in table_parameters(model))}
    assert names == {
        "embedding.rows.d8.embeddings.t_item.weight",
        "embedding.bags.embedding_bags.t_user.weight",
        "embedding.bags.embedding_bags.t_tags.weight",
        "embedding.bags.embedding_bags.t_city.weight",
    }


def test_unsupported_choices_are_refused_clearly(tiny: str) -> None:
    from recsys.embedding.sharding import constraints_for
    from recsys.train.strategy import sparse_optimizer_class

    model, _, _ = _build(tiny)
    with pytest.raises(ValueError, match="table 't_item' \\(sequence\\) cannot be sharded 'table_wise' on cpu"):
        constraints_for(model, "cpu", {"t_item": "table_wise"})
    with pytest.raises(ValueError, match="unknown tables \\['t_nope'\\]"):
        constraints_for(model, "cpu", {"t_nope": "row_wise"})
    with pytest.raises(ValueError, match="'adam' needs CUDA"):
        sparse_optimizer_class("adam", "cpu")
    with pytest.raises(ValueError, match="UVM caching"):
        constraints_for(model, "cpu", cache_load_factor=0.2)


# -- Lightning end to end: `recsys fit/predict --trainer.strategy torchrec --trainer.devices 2` ---------
def _recsys(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    recsys = Path(sys.executable).parent / "recsys"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(recsys), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _common(data: str, logs: Path, devices: int, version: str) -> list[str]:
    return [
        "--config",
        str(ROOT / "configs/movielens/din.yaml"),
        "--data.path",
        data,
        "--data.batch_size",
        "256",
        "--model.init_args.mba_lambda",
        "0",
        "--trainer.strategy",
        "torchrec",
        "--trainer.devices",
        str(devices),
        "--trainer.logger.init_args.save_dir",
        str(logs),
        "--trainer.logger.init_args.version",
        version,
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.log_every_n_steps",
        "1",
    ]


def _train_losses(run_dir: Path) -> dict[int, float]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {e.step: e.value for e in events.Scalars("train/loss")}


def test_lightning_two_ranks_checkpoint_resume_and_load_at_one_rank(tiny: str, tmp_path: Path) -> None:
    logs = tmp_path / "runs"
    # uninterrupted: 2 epochs on 2 ranks
    full_run = _recsys("fit", *_common(tiny, logs, 2, "full"), "--trainer.max_epochs", "2", cwd=tmp_path)
    assert "val: 600 rows scored by 2 ranks (300 + 300)" in full_run.stdout + full_run.stderr  # half each
    # interrupted: 1 epoch, then resumed from its last checkpoint for the second
    _recsys("fit", *_common(tiny, logs, 2, "part"), "--trainer.max_epochs", "1", cwd=tmp_path)
    last = logs / "movielens/din/part/checkpoints/last.ckpt"
    assert (last / "lightning.pt").exists() and len(list(last.glob("*.distcp"))) == 2  # one file per rank
    _recsys(
        "fit", *_common(tiny, logs, 2, "resumed"), "--trainer.max_epochs", "2", "--ckpt_path", str(last), cwd=tmp_path
    )
    full = _train_losses(logs / "movielens/din/full")
    resumed = _train_losses(logs / "movielens/din/resumed")
    assert resumed and set(resumed) <= set(full)
    first = min(resumed)
    assert resumed[first] == pytest.approx(full[first], abs=1e-6)  # the next step after resuming
    for step in resumed:
        assert resumed[step] == pytest.approx(full[step], abs=1e-4)

    # the 2-rank checkpoint, loaded unsharded at 1 rank, predicts what the 2 ranks predict
    best = logs / "movielens/din/full/checkpoints/best.ckpt"
    _recsys("predict", *_common(tiny, logs, 2, "predict"), "--ckpt_path", str(best), cwd=tmp_path)
    sharded = pq.read_table(logs / "movielens/din/predict/predictions.parquet").to_pandas()
    from recsys.eval.report import predict_split
    from recsys.train.checkpoint import load_model

    model = load_model(best)
    dm = CTRDataModule(tiny)
    unsharded = predict_split(model, dm.stream("test"))
    np.testing.assert_allclose(unsharded["prob"], sharded["prob"].to_numpy(), atol=1e-6)
    # each rank scored half of every val batch; the gathered metrics are the whole split's, as one process
    # computes them by the protocol's definitions from the best checkpoint
    events = EventAccumulator(str(logs / "movielens/din/full"))
    events.Reload()
    logged = {name: {e.step: e.value for e in events.Scalars(f"val/{name}")} for name in ("auc", "gauc", "logloss")}
    step = max(logged["auc"], key=logged["auc"].get)  # best.ckpt monitors the max val/auc
    val = predict_split(model, dm.stream("val"))
    expected = plain_ctr_metrics(val["label"], val["prob"], val["group"])
    # a half-size batch rounds a little differently (probabilities within 1e-6), which may swap a few
    # near-tied pairs: allow 3 swapped pairs, in the whole split and in the user where one weighs most
    # (a missing or doubled share would move the metrics by far more)
    labels, groups = val["label"] > 0.5, val["group"]
    pair = 1 / (labels.sum() * (~labels).sum())
    both = [u for u in np.unique(groups) if 0 < labels[groups == u].sum() < (groups == u).sum()]
    weighed = sum((groups == u).sum() for u in both)  # GAUC weighs a user by its rows among such users
    users = [(groups == u).sum() / weighed / (labels[groups == u].sum() * (~labels[groups == u]).sum()) for u in both]
    tolerance = {"auc": 3 * pair, "gauc": 3 * max(users), "logloss": 1e-5}
    for name in ("auc", "gauc", "logloss"):
        assert logged[name][step] == pytest.approx(expected[name], abs=tolerance[name]), name
    # batches of 599 then 1 row: rank 1's first share is padded by one row, its second is padding only
    # (a rank with nothing to score still takes part in the collective step)
    validated = _recsys(
        "validate",
        *_common(tiny, logs, 2, "validate"),
        "--data.eval_batch_size",
        "599",
        "--ckpt_path",
        str(best),
        cwd=tmp_path,
    )
    assert "val: 600 rows scored by 2 ranks (301 + 299)" in validated.stdout + validated.stderr
    events = EventAccumulator(str(logs / "movielens/din/validate"))
    events.Reload()
    for name in ("auc", "gauc", "logloss"):
        assert events.Scalars(f"val/{name}")[-1].value == pytest.approx(expected[name], abs=tolerance[name]), name
    bce = -np.mean(np.log(np.where(labels, val["prob"], 1 - val["prob"])))  # val/loss: the rows' mean cross-entropy
    assert events.Scalars("val/loss")[-1].value == pytest.approx(bce, abs=1e-5)


def test_checkpoints_move_from_one_rank_to_two(tiny: str, tmp_path: Path) -> None:
    """A sharded checkpoint written by 1 rank, and a plain Lightning .ckpt, both load into 2 ranks."""
    from recsys.eval.report import predict_split
    from recsys.train.checkpoint import load_model

    logs = tmp_path / "runs"
    _recsys("fit", *_common(tiny, logs, 1, "one"), "--trainer.max_epochs", "1", cwd=tmp_path)
    base = [
        "--config",
        str(ROOT / "configs/movielens/base.yaml"),
        "--data.path",
        tiny,
        "--trainer.max_epochs",
        "1",
        "--trainer.logger.init_args.save_dir",
        str(logs),
        "--trainer.enable_progress_bar",
        "false",
    ]
    _recsys("fit", *base, "--trainer.logger.init_args.version", "plain", cwd=tmp_path)
    cases = [
        (logs / "movielens/din/one/checkpoints/best.ckpt", _common(tiny, logs, 2, "p1")),
        (
            logs / "movielens/base/plain/checkpoints/best.ckpt",
            [
                *base,
                "--trainer.strategy",
                "torchrec",
                "--trainer.devices",
                "2",
                "--trainer.logger.init_args.version",
                "p2",
            ],
        ),
    ]
    assert cases[0][0].is_dir() and cases[1][0].is_file()
    for ckpt, args in cases:
        _recsys("predict", *args, "--ckpt_path", str(ckpt), cwd=tmp_path)
        version = args[args.index("--trainer.logger.init_args.version") + 1]
        name = "din" if "din" in str(ckpt) else "base"
        sharded = pq.read_table(logs / f"movielens/{name}/{version}/predictions.parquet").column("prob").to_numpy()
        expected = predict_split(load_model(ckpt), CTRDataModule(tiny).stream("test"))["prob"]
        np.testing.assert_allclose(sharded, expected, atol=1e-6, err_msg=str(ckpt))


def test_plan_dry_run(tiny: str, capsys: pytest.CaptureFixture) -> None:
    from recsys.commands.plan import main as plan_main

    config = str(ROOT / "configs/movielens/din.yaml")
    assert plan_main(["--config", config, "--world-size", "4", "--", "--data.path", tiny]) == 0
    out = capsys.readouterr().out
    assert "| embedding.rows.d16.t_item | 61 × 16 | row_wise | fused | [0, 1, 2, 3] |" in out
    assert sum(line.startswith("| 3 |") for line in out.splitlines()) == 1  # a memory line per rank
    assert (
        plan_main(
            [
                "--config",
                config,
                "--world-size",
                "2",
                "--sharding-types",
                "t_item=table_wise",
                "--",
                "--data.path",
                tiny,
            ]
        )
        == 2
    )
    assert "cannot be sharded 'table_wise' on cpu" in capsys.readouterr().err


def test_cuda_plan_with_row_wise_and_uvm_caching_dry_run(tiny: str) -> None:
    """The CUDA/NCCL configuration is planned (no GPU needed to plan): row-wise + UVM caching."""
    from recsys.embedding.sharding import plan_model

    model, _, _ = _build(tiny)
    plan = plan_model(model, 4, "cuda", {"pooled": "table_row_wise", "sequence": "row_wise"}, cache_load_factor=0.2)
    text = str(plan)
    assert "row_wise" in text and "table_row_wise" in text and "fused_uvm_caching" in text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA + fbgemm-gpu (CUDA build) + NCCL")
def test_cuda_training_step_with_uvm_caching(tiny: str, tmp_path: Path) -> None:  # pragma: no cover - no GPU in CI
    dist.init_process_group("nccl", init_method=file_rendezvous(str(tmp_path)), rank=0, world_size=1)
    try:
        model, batches, _ = _build(tiny)
        dmp = shard_model(
            model,
            1,
            torch.device("cuda"),
            {"pooled": "row_wise"},
            cache_load_factor=0.5,
            sparse_optimizer="adam",
            sparse_lr=0.01,
        )
        batch = batches[0].to("cuda")
        loss = F.binary_cross_entropy_with_logits(dmp(batch), batch.labels)
        loss.backward()
        assert torch.isfinite(loss)
    finally:
        dist.destroy_process_group()


def _meta_worker(rank: int, world: int, rendezvous: str, data: str, out: str) -> None:
    from recsys.embedding.tables import tables_on

    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    torch.set_num_threads(1)
    with tables_on("meta"):
        model, batches, _ = _build(data)
    assert all(p.is_meta for p in table_parameters(model))  # nothing allocated for the tables
    dmp = shard_model(model, world, torch.device("cpu"), sparse_optimizer="sgd", sparse_lr=0.1)
    local = share(batches[0], rank, world)
    loss = F.binary_cross_entropy_with_logits(dmp(local), local.labels)
    loss.backward()
    materialised = not any(p.is_meta for p in dmp.parameters())
    if rank == 0:
        np.savez(out, loss=loss.item(), materialised=materialised)
    dist.destroy_process_group()


def test_tables_built_on_meta_are_materialised_as_shards(tiny: str, tmp_path: Path) -> None:
    out = str(tmp_path / "meta.npz")
    spawn_ranks(_meta_worker, 2, tiny, out)
    result = np.load(out)
    assert bool(result["materialised"]) and np.isfinite(result["loss"]) and 0.3 < float(result["loss"]) < 1.5


def test_cli_builds_tables_on_meta_when_the_strategy_asks(tiny: str, tmp_path: Path) -> None:
    from recsys.train.cli import run

    args = [
        "--config",
        str(ROOT / "configs/movielens/din.yaml"),
        "--data.path",
        tiny,
        "--trainer.logger",
        "false",
        "--trainer.strategy.class_path",
        "recsys.train.strategy.TorchrecStrategy",
    ]
    meta = run([*args, "--trainer.strategy.init_args.init_tables_on_meta", "true"], subcommand=False)
    assert all(p.is_meta for p in table_parameters(meta.model))
    assert not any(p.is_meta for p in meta.model.dnn.parameters())  # dense layers are real
    plain = run(args, subcommand=False)
    assert not any(p.is_meta for p in table_parameters(plain.model))
