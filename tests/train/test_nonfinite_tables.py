"""A NaN gradient reaching the embedding lookups (with a finite loss) changes no table row and no dense
weight, on FBGEMM's fused tables that update inside backward, for every CPU sparse optimizer and
table kind, on 2 ranks: the layer's gradient guard zeroes it before the fused update."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from recsys.data.datamodule import CTRDataModule
from recsys.data.parquet import ParquetStream
from recsys.models.base import EmbeddingMLP
from tests.conftest import write_dataset

KINDS = {
    "plain": {"dim": 8},
    "unified": {"kind": "unified", "dim": 8, "rows": 40, "probes": 2},
    "supernet": {"kind": "optembed", "dim": 8},
}
OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad")


def _snapshot(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's part of every table (its shards) and every dense weight, copied (floating-point state:
    not the supernet's step counter, which counts the step whatever happens to it)."""
    out = {}
    for name, value in net.state_dict().items():
        local = value.local_shards() if hasattr(value, "local_shards") else None
        if local is not None:
            for i, shard in enumerate(local):
                out[f"{name}#{i}"] = shard.tensor.detach().clone()
        elif hasattr(value, "to_local"):
            out[name] = value.to_local().detach().clone()
        elif isinstance(value, torch.Tensor):
            out[name] = value.detach().clone()
    return {k: v for k, v in out.items() if v.is_floating_point()}


def _worker(rank: int, world: int, rendezvous: str, data: str, out: str) -> None:
    from recsys.train.strategy import shard_model
    from tests.ranks import share
    from tests.train.faults import poison_embedding_gradient

    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    torch.set_num_threads(1)
    dm = CTRDataModule(data)
    stream = ParquetStream(data, "train", dm.vocab, batch_size=128, shuffle=True, rank=0, world_size=1)
    batches = [share(b, rank, world) for _, b in zip(range(3), stream, strict=False)]
    results = {}
    for kind, block in KINDS.items():
        for name in OPTIMIZERS:
            torch.manual_seed(0)
            model = EmbeddingMLP(dm.dataset_info, embedding=block, dnn_hidden_units=[8]).train()
            net = shard_model(model, world, torch.device("cpu"), sparse_optimizer=name, sparse_lr=0.1)
            dense = torch.optim.Adam(
                [p for p in net.parameters() if not hasattr(p, "_in_backward_optimizers")], lr=0.01
            )
            changed = []
            for step, batch in enumerate(batches):
                hook = poison_embedding_gradient(model.embedding) if step == 1 else None
                before = _snapshot(net)
                dense.zero_grad()
                loss = F.binary_cross_entropy_with_logits(net(batch), batch.labels)
                loss.backward()
                if not model.embedding.nonfinite_gradient:  # what CTRModule.optimizer_step does
                    dense.step()
                after = _snapshot(net)
                changed.append(sum(not torch.equal(before[k], after[k]) for k in before))
                if hook is not None:
                    hook.remove()
                    assert model.embedding.nonfinite_gradient and torch.isfinite(loss)
            finite = all(torch.isfinite(v).all() for v in _snapshot(net).values() if v.is_floating_point())
            results[f"{kind}-{name}"] = np.array(changed + [int(finite)])
    if rank == 0:
        np.savez(out, **results)
    dist.destroy_process_group()


def test_a_poisoned_embedding_gradient_changes_nothing_on_fused_tables(tmp_path: Path) -> None:
    from tests.ranks import spawn_ranks

    data = str(write_dataset(tmp_path / "tiny"))
    out = str(tmp_path / "result.npz")
    spawn_ranks(_worker, 2, data, out)
    result = np.load(out)
    for cell in (f"{k}-{o}" for k in KINDS for o in OPTIMIZERS):
        clean, poisoned, again, finite = result[cell]
        assert poisoned == 0, f"{cell}: the poisoned step changed {poisoned} tensors"  # bit for bit
        assert clean > 0 and again > 0 and finite == 1, (cell, result[cell])  # the other steps did train
