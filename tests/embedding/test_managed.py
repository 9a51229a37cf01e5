"""Managed tables: admission after N sightings, eviction that re-initialises rows and optimizer state,
state that survives a checkpoint, and the kind end to end (train, export, serve)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torchrec.modules.mc_modules import LRU_EvictionPolicy, MCHManagedCollisionModule
from torchrec.sparse.jagged_tensor import JaggedTensor

from recsys.data.datamodule import CTRDataModule
from recsys.data.schema import parse_schema
from recsys.data.vocab import DatasetInfo
from recsys.embedding.layer import EmbeddingLayer
from recsys.embedding.managed import EMPTY, ManagedIds
from recsys.embedding.spec import EmbeddingConfigError, EmbeddingSpec
from recsys.eval.report import predict_split
from recsys.export.exporter import export
from recsys.export.loader import load
from recsys.train.checkpoint import load_model
from recsys.train.cli import run
from tests.conftest import TINY_SCHEMA, write_dataset
from tests.data.test_online_raw_ids import RAW_SCHEMA
from tests.export.helpers import CONFIGS, fit, raw_rows


def ids(values: list[int]) -> dict[str, JaggedTensor]:
    return {"u": JaggedTensor(values=torch.tensor(values), lengths=torch.tensor([len(values)]))}


def stream(steps: int, seed: int, span: int = 40) -> list[list[int]]:
    """Batches of ids drifting upwards, so old ids fade and new ones keep coming."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, span, 6) + t // 3).tolist() for t in range(steps)]


def test_slots_at_admit_after_1_are_torchrecs_own() -> None:
    """With nothing to wait for, the slots are exactly those of torchrec's MCH module on the same ids."""
    ours = ManagedIds("u", capacity=12, eviction="lru", interval=2).train()
    theirs = MCHManagedCollisionModule(
        zch_size=12, device=torch.device("cpu"), eviction_policy=LRU_EvictionPolicy(), eviction_interval=2
    ).train()
    for batch in stream(60, seed=0):
        assert ours(ids(batch))["u"].values().tolist() == theirs(ids(batch))["u"].values().tolist()


def test_admission_after_n_sightings_matches_a_plain_counter() -> None:
    """An id reads its own slot from the step its count across steps reaches admit_after; before, the
    default row (the table is large enough that nothing is evicted)."""
    managed = ManagedIds("u", capacity=200, admit_after=3, interval=1).train()
    seen: Counter = Counter()
    for batch in stream(40, seed=1):
        seen.update(batch)
        slots = managed(ids(batch))["u"].values().tolist()
        expected_default = [seen[i] < 3 for i in batch]
        assert [s == managed.default_slot for s in slots] == expected_default
    in_table = set(managed.slot_ids().tolist()) - {EMPTY}
    assert in_table == {i for i, n in seen.items() if n >= 3}
    assert set(managed.pending_ids.tolist()) == {i for i, n in seen.items() if n < 3}
    assert int(managed.admissions) == len(in_table) and int(managed.evictions) == 0


def test_pending_ids_and_the_intervals_history_survive_a_checkpoint() -> None:
    """A module restored mid-interval from a state dict continues exactly as the uninterrupted one."""
    batches = stream(50, seed=2)

    def make() -> ManagedIds:
        return ManagedIds("u", capacity=16, admit_after=2, eviction="lru", interval=4).train()

    original = make()
    for batch in batches[:21]:  # 21 steps: one past an eviction boundary, mid-interval
        original(ids(batch))
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in original.state_dict().items()}
    restored, forgetful = make(), make()
    restored.load_state_dict(state)
    forgetful.load_state_dict({k: v for k, v in state.items() if not k.endswith("_extra_state")}, strict=False)
    assert len(restored.pending_ids) > 0
    diverged = False
    for batch in batches[21:]:
        expected = original(ids(batch))["u"].values().tolist()
        assert restored(ids(batch))["u"].values().tolist() == expected
        diverged |= forgetful(ids(batch))["u"].values().tolist() != expected
    assert torch.equal(restored.slot_ids(), original.slot_ids())
    assert diverged  # without the extra state, pending ids and the interval's phase are lost


RAW_USERS = parse_schema(
    {"label": "y", "features": [{"name": "user", "type": "categorical", "vocabulary": "none"}]}, "s.yaml"
)


def layer(capacity: int = 3) -> EmbeddingLayer:
    info = DatasetInfo("mem", RAW_USERS.to_dict(), {"user": 0})
    block = {"dim": 4, "features": {"user": {"kind": "managed", "capacity": capacity}}}
    return EmbeddingLayer(info, block).train()


def test_an_evicted_row_is_reinitialised_with_its_optimizer_state() -> None:
    """torchrec's unsharded managed collections hand a new id the evicted id's trained row and its
    Adam moments; here the row is drawn afresh from the table's initializer and its moments zeroed."""
    emb = layer(capacity=3)  # 2 slots + the default row
    weight = emb.table_weight("m_user")
    optimizer = torch.optim.Adam(emb.parameters(), lr=0.5)

    def forward(users: list[int]) -> torch.Tensor:
        jagged = JaggedTensor(values=torch.tensor(users), lengths=torch.ones(len(users), dtype=torch.int32))
        return emb.embed({"user": jagged}, len(users)).pooled["user"]

    for _ in range(3):  # 101 and 102 train for three steps: far from their initial values
        optimizer.zero_grad()
        forward([101, 102]).pow(2).sum().mul(-1).backward()  # grow the rows
        emb.reset_optimizer_rows(optimizer)
        optimizer.step()
    trained, moments = weight.detach().clone(), {k: v.clone() for k, v in optimizer.state[weight].items()}
    slot_of = {v: s for s, v in enumerate(emb.managed["user"].slot_ids().tolist()) if v != EMPTY}
    assert (trained[slot_of[101]].abs() > 1.0).all()
    forward([103, 102])  # LRU: 101 gives its slot to 103 (tie with 102 broken by torchrec: 101 goes)
    new = emb.managed["user"].slot_ids().tolist().index(103)
    assert new == slot_of[101] and 101 not in emb.managed["user"].slot_ids().tolist()
    assert (weight[new].abs() <= math.sqrt(1 / 3)).all()  # torchrec's initializer: U(±√(1/rows))
    assert torch.equal(weight[slot_of[102]], trained[slot_of[102]])  # the others untouched
    emb.reset_optimizer_rows(optimizer)
    for key in ("exp_avg", "exp_avg_sq"):
        state = optimizer.state[weight][key]
        assert (moments[key][new] != 0).all() and (state[new] == 0).all()
        assert torch.equal(state[slot_of[102]], moments[key][slot_of[102]])
    assert int(emb.managed["user"].evictions) == 1 and int(emb.managed["user"].admissions) == 3


def test_capacity_smaller_than_one_batch_is_refused_naming_the_key() -> None:
    emb = layer(capacity=3)
    users = JaggedTensor(values=torch.tensor([1, 2, 3]), lengths=torch.ones(3).int())
    with pytest.raises(ValueError, match=r"3 distinct admitted ids do not fit its 2 slots.*features.user.capacity"):
        emb.embed({"user": users}, 3)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"kind": "managed"}, "embedding.features.user.capacity: kind 'managed' needs a capacity"),
        ({"kind": "managed", "capacity": 10, "admit_after": 0}, "embedding.features.user.admit_after: expected an"),
        ({"kind": "managed", "capacity": 1}, "embedding.features.user.capacity: expected an integer ≥ 2"),
        ({"kind": "managed", "capacity": 9, "eviction": "ttl"}, "eviction: one of ['lru', 'lfu', 'decayed_lfu']"),
        ({"kind": "hashed", "rows": 9, "capacity": 9}, "features.user.capacity: not taken by kind 'hashed'"),
    ],
)
def test_bad_managed_settings_are_refused_naming_the_key(entry: dict, message: str) -> None:
    with pytest.raises(EmbeddingConfigError) as err:
        EmbeddingSpec.parse({"dim": 8, "features": {"user": entry}}, RAW_USERS)
    assert message in str(err.value)


def test_managed_tables_train_export_and_serve(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """DIN over raw users and a managed item table its behaviors read too; the export scores as the model."""
    data = write_dataset(tmp_path / "raw", schema=RAW_SCHEMA)
    block = {
        "dim": 8,
        "features": {
            "user": {"kind": "managed", "capacity": 48, "admit_after": 2, "interval": 3},
            "tags": {"kind": "hashed", "rows": 4},
            "item": {"kind": "managed", "capacity": 64, "eviction": "decayed_lfu"},
        },
    }
    ckpt = fit(data, tmp_path / "runs", "managed", "--config", str(CONFIGS / "din.yaml"), embedding=block)
    model = load_model(ckpt)
    stats = model.embedding.managed_statistics()
    assert stats["managed/user/admissions"] == 40 and stats["managed/item/admissions"] == 60  # every id, once
    from recsys.commands.tables import main as tables

    assert tables([str(ckpt)]) == 0
    printed = capsys.readouterr().out
    assert "user             managed           48    8    raw ids  occupancy 85.1%, 40 admitted, 0 evicted" in printed
    reference = predict_split(model, CTRDataModule(str(data), eval_batch_size=256).stream("test"))
    scorer = load(export(ckpt, tmp_path / "export", "fp32", progress=False))
    np.testing.assert_allclose(scorer.score(raw_rows(data, n=50)), reference["prob"][:50], atol=1e-5, rtol=0)
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    transform = manifest["embedding"]["features"]["hist_item"]["lookups"][0]["transform"]
    assert transform == {"kind": "managed", "module": "embedding.managed.item"}


def test_managed_on_several_processes_without_sharding_is_refused_when_the_config_is_parsed(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = write_dataset(tmp_path / "tiny", schema=TINY_SCHEMA)
    block = json.dumps({"dim": 8, "features": {"user": {"kind": "managed", "capacity": 64}}})
    args = ["--config", str(CONFIGS / "base.yaml"), "--data.path", str(data), "--model.init_args.embedding", block]
    with pytest.raises(SystemExit):
        run([*args, "--trainer.devices", "2"], subcommand=False)
    assert "kind 'managed' on several processes needs --trainer.strategy torchrec" in capsys.readouterr().err


def test_a_managed_table_is_skipped_by_a_call_that_does_not_read_it(tmp_path: Path) -> None:
    """TwoTower's item catalogue embeds the item alone; the user's managed table is not read (nor counted)."""
    from recsys.models.two_tower import TwoTower

    data = write_dataset(tmp_path / "tiny")
    info = CTRDataModule(str(data)).dataset_info
    block = {"dim": 8, "features": {"user": {"kind": "managed", "capacity": 64}}}
    model = TwoTower(info, user="user", item="item", history="hist_item", embedding=block).eval()
    vectors = model.item_vectors(torch.arange(5))
    assert vectors.shape[0] == 5 and int(model.embedding.managed["user"].step) == 0


def _ranks_worker(rank: int, world: int, rendezvous: str, data: str, out: str) -> None:
    import torch.distributed as dist

    from recsys.data.parquet import ParquetStream
    from recsys.models.base import EmbeddingMLP
    from recsys.train.strategy import shard_model
    from tests.ranks import share
    from tests.test_composition import loss_of

    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dm = CTRDataModule(data)
    block = {"dim": 8, "features": {"user": {"kind": "managed", "capacity": 24}, "tags": {"kind": "hashed", "rows": 8}}}
    model = EmbeddingMLP(dm.dataset_info, embedding=block, dnn_hidden_units=[8]).train()
    net = shard_model(model, world, torch.device("cpu"), sparse_optimizer="rowwise_adagrad", sparse_lr=0.3)
    optimizer = torch.optim.SGD([p for p in net.parameters() if not hasattr(p, "_in_backward_optimizers")], lr=0.1)
    stream = ParquetStream(data, "train", dm.vocab, batch_size=16, shuffle=True, rank=0, world_size=1)
    losses, managed = [], model.embedding.managed["user"]
    states = model.embedding.bags.fused_optimizer.state.values()  # row-wise Adagrad: one momentum per row
    momentum = [  # (row offset, this rank's rows of the table's momentum)
        (shard.metadata.shard_offsets[0], shard.tensor)
        for st in states
        for k, v in st.items()
        if k == "m_user.momentum1"
        for shard in v.local_shards()
    ]

    checked, wrong = torch.zeros(1), torch.zeros(1)
    for step, batch in zip(range(12), stream, strict=False):
        before = managed.slot_ids().clone()
        if step == 11:  # a huge momentum everywhere: the slots this step hands to new ids must start from 0
            for _, tensor in momentum:
                tensor.fill_(1e6)
        optimizer.zero_grad()
        loss = loss_of(net, model, share(batch, rank, world))
        loss.backward()
        optimizer.step()
        if step == 11:
            handed = torch.nonzero((managed.slot_ids() != before) & (before != EMPTY)).flatten()
            for start, tensor in momentum:  # the handed slots this rank holds, at their place in its shard
                local = handed[(handed >= start) & (handed < start + len(tensor))] - start
                checked += len(local)
                wrong += int((tensor[local] >= 1e5).sum())
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world)
    dist.all_reduce(checked)
    dist.all_reduce(wrong)
    if rank == 0:
        np.savez(
            out,
            losses=np.array(losses),
            evictions=int(managed.evictions),
            slots=managed.slot_ids().numpy(),
            checked=float(checked),
            wrong=float(wrong),
        )
    dist.destroy_process_group()


def test_managed_tables_sharded_over_two_ranks_evict_as_on_one(tmp_path: Path) -> None:
    """Every rank sees the step's ids of all ranks, so slots, evictions and fresh rows are the same as on
    one rank; evicted rows are written, and their row-wise Adagrad momentum zeroed, on the rank holding
    them (FBGEMM's reset_weight_momentum has no CPU kernel)."""
    from tests.ranks import spawn_ranks

    data = str(write_dataset(tmp_path / "tiny"))
    results = {}
    for world in (1, 2):
        spawn_ranks(_ranks_worker, world, data, str(tmp_path / f"world{world}.npz"))
        results[world] = np.load(tmp_path / f"world{world}.npz")
    assert int(results[1]["evictions"]) > 10  # 40 users through 23 slots
    assert int(results[2]["evictions"]) == int(results[1]["evictions"])
    np.testing.assert_array_equal(results[2]["slots"], results[1]["slots"])
    np.testing.assert_allclose(results[2]["losses"], results[1]["losses"], atol=2e-5, rtol=0)
    for world in (1, 2):  # every handed slot, on whichever rank holds it, starts from zero momentum
        assert float(results[world]["checked"]) > 0 and float(results[world]["wrong"]) == 0
