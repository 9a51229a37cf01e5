"""Sharding plans for a model's torchrec tables: constraints, planner, and plan summaries.

Example::

    plan = plan_model(model, world_size=2, device_type="cpu", sharding_types={"t_user_id": "column_wise"})
    print(describe_plan(plan, model, world_size=2))
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingPlan

# What runs where. CPU/gloo: verified here (docs/stack.md); the planner refuses row-wise pooled tables
# on CPU (gloo has no reduce-scatter). CUDA/NCCL: every torchrec sharding type.
ALLOWED = {
    ("cpu", "pooled"): ["table_wise", "column_wise", "data_parallel"],
    ("cpu", "sequence"): ["row_wise"],
    ("cuda", "pooled"): ["table_wise", "column_wise", "row_wise", "table_row_wise", "data_parallel"],
    ("cuda", "sequence"): ["row_wise", "table_wise", "column_wise", "data_parallel"],
}
KERNELS = {"cpu": ["fused", "dense"], "cuda": ["fused", "fused_uvm_caching", "fused_uvm", "dense"]}


def sharders() -> list:
    return [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]


def embedding_tables(model: nn.Module) -> dict[str, str]:
    """``{table name: "pooled" | "sequence"}`` for every torchrec collection in ``model``."""
    tables = {}
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection):
            tables.update({c.name: "pooled" for c in module.embedding_bag_configs()})
        elif isinstance(module, EmbeddingCollection):
            tables.update({c.name: "sequence" for c in module.embedding_configs()})
    return tables


MANAGED_SHARDING = ("table_wise", "row_wise")  # whole rows per shard, the fused kernel's optimizer


def constraints_for(
    model: nn.Module,
    device_type: str,
    sharding_types: dict[str, str] | None = None,
    compute_kernel: str = "fused",
    cache_load_factor: float | None = None,
) -> dict[str, ParameterConstraints]:
    """Per-table constraints: the allowed sharding types for the device, narrowed by
    ``sharding_types`` (``{table: type}``, or ``{"pooled": type}`` / ``{"sequence": type}`` for all)."""
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device_type must be 'cpu' or 'cuda', got {device_type!r}")
    if compute_kernel not in KERNELS[device_type]:
        raise ValueError(
            f"compute_kernel {compute_kernel!r} is not available on {device_type} (choose from {KERNELS[device_type]})"
        )
    if cache_load_factor is not None and device_type != "cuda":
        raise ValueError("UVM caching (cache_load_factor) needs CUDA")
    tables = embedding_tables(model)
    requested = dict(sharding_types or {})
    unknown = set(requested) - set(tables) - {"pooled", "sequence"}
    if unknown:
        raise ValueError(f"sharding_types names unknown tables {sorted(unknown)}; the model has {sorted(tables)}")
    out = {}
    layer = getattr(model, "embedding", None)
    managed = {f"m_{owner}" for owner in getattr(layer, "managed", {})}
    for table, kind in tables.items():
        allowed = ALLOWED[(device_type, kind)]
        if table in managed:  # evicted rows are rewritten shard by shard, with the fused optimizer's state
            allowed = [t for t in allowed if t in MANAGED_SHARDING]
            if cache_load_factor is not None or compute_kernel != "fused":
                raise ValueError(
                    f"table {table!r} is managed: its evicted rows are rewritten in the fused kernel's weights, "
                    f"which UVM caching (cache_load_factor) or a {compute_kernel!r} kernel would not see; use the "
                    f"fused kernel without caching"
                )
        wanted = requested.get(table, requested.get(kind))
        if wanted is not None and wanted not in allowed:
            raise ValueError(
                f"table {table!r} ({kind}) cannot be sharded {wanted!r} on {device_type}; allowed: {allowed}"
            )
        kernel = "fused_uvm_caching" if cache_load_factor is not None else compute_kernel
        out[table] = ParameterConstraints(
            sharding_types=[wanted] if wanted else allowed,
            compute_kernels=["dense"] if wanted == "data_parallel" else [kernel],  # replicas train as dense
            cache_params=_cache_params(cache_load_factor),
        )
    return out


def _cache_params(cache_load_factor: float | None):
    if cache_load_factor is None:
        return None
    from torchrec.distributed.types import CacheParams

    return CacheParams(load_factor=cache_load_factor)


def plan_model(
    model: nn.Module,
    world_size: int,
    device_type: str = "cpu",
    sharding_types: dict[str, str] | None = None,
    compute_kernel: str = "fused",
    cache_load_factor: float | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> ShardingPlan:
    """A sharding plan; collective (all ranks agree) when ``process_group`` is given."""
    constraints = constraints_for(model, device_type, sharding_types, compute_kernel, cache_load_factor)
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world_size, compute_device=device_type), constraints=constraints
    )
    if process_group is not None:
        return planner.collective_plan(model, sharders(), process_group)
    return planner.plan(model, sharders())


def describe_plan(plan: ShardingPlan, model: nn.Module, world_size: int, optimizer_slots: float = 1.0) -> str:
    """A readable plan: table → sharding type, kernel, ranks; and bytes per rank.

    Per-rank memory counts the table shards and ``optimizer_slots`` rows of optimizer state per
    weight element (Adagrad: 1, Adam: 2, row-wise Adagrad: ~0); dense layers are replicated.
    """
    sizes = {}
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection):
            sizes.update({c.name: (c.num_embeddings, c.embedding_dim) for c in module.embedding_bag_configs()})
        elif isinstance(module, EmbeddingCollection):
            sizes.update({c.name: (c.num_embeddings, c.embedding_dim) for c in module.embedding_configs()})
    per_rank: dict[int, float] = defaultdict(float)
    lines = ["| table | rows × dim | sharding | kernel | ranks |", "|---|---|---|---|---|"]
    for module_path, module_plan in plan.plan.items():
        for name, spec in module_plan.items():
            rows, dim = sizes.get(name, (0, 0))
            shards = spec.sharding_spec.shards if spec.sharding_spec is not None else None
            if shards:
                ranks = [s.placement.rank() for s in shards]
                for s in shards:
                    per_rank[s.placement.rank()] += s.shard_sizes[0] * s.shard_sizes[1] * 4 * (1 + optimizer_slots)
            else:  # data parallel: a full copy everywhere
                ranks = list(range(world_size))
                for r in ranks:
                    per_rank[r] += rows * dim * 4 * (1 + optimizer_slots)
            lines.append(
                f"| {module_path}.{name} | {rows:,} × {dim} | {spec.sharding_type} | {spec.compute_kernel} | {ranks} |"
            )
    dense = sum(p.numel() for n, p in model.named_parameters() if not _is_table_param(model, n)) * 4 * 3
    lines += ["", "| rank | embedding tables + optimizer state | dense (weights + Adam) | total |", "|---|---|---|---|"]
    for r in range(world_size):
        lines.append(f"| {r} | {_mib(per_rank[r])} | {_mib(dense)} | {_mib(per_rank[r] + dense)} |")
    return "\n".join(lines)


def _is_table_param(model: nn.Module, name: str) -> bool:
    owner = model
    for part in name.split(".")[:-1]:
        owner = getattr(owner, part, None)
        if owner is None:
            return False
        if isinstance(owner, EmbeddingBagCollection | EmbeddingCollection):
            return True
    return False


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.2f} MiB"


@torch.no_grad()
def copy_full_weights(sharded_state: dict, full_state: dict) -> None:
    """Copies unsharded tensors into a sharded model's state (its shards or replicated tensors),
    so a model starts from the same weights whatever the world size and plan."""
    for key, target in sharded_state.items():
        if key not in full_state:
            continue
        source = full_state[key]
        if isinstance(target, ShardedTensor):
            for shard in target.local_shards():
                (r0, c0), (rows, cols) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                shard.tensor.copy_(source[r0 : r0 + rows, c0 : c0 + cols])
        elif hasattr(target, "to_local"):  # DTensor
            local = target.to_local()
            offsets = _dtensor_offsets(target)
            local.copy_(source[tuple(slice(o, o + s) for o, s in zip(offsets, local.shape, strict=True))])
        elif isinstance(target, torch.Tensor):
            target.copy_(source)


def _dtensor_offsets(tensor) -> tuple[int, ...]:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offsets = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tuple(offsets)
