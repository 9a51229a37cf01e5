"""OptEmbed (Lyu et al. 2022): learnable row pruning + per-table dimension search → compact tables.

Three stages, each a separate run (``docs/optembed.md`` walks through them):

1. **Supernet** (``OptEmbedBag``, ``stage: supernet``). A looked-up row ``e`` of table ``t`` is kept
   iff ``‖e‖₁ − t_t > 0``: the forward is that unit step, the backward a straight-through
   estimator (``step_ste``). The loss gains ``α · Σ_t exp(−t_t)``, which pushes thresholds up;
   thresholds train with their own learning rate. Masks act on looked-up rows *before* pooling,
   so multi-hot lists and sequences are pruned row by row. In training every sample draws, per
   table, a dimension ``d ∈ {1..D}`` uniformly and keeps that prefix (OptEmbed-D); evaluation
   uses ``eval_dims`` (all ``D`` unless a search candidate is being scored).
2. **Search** (``recsys optembed search``, in ``recsys.train.optembed``): evolutionary search over
   per-table dims on the validation split with the supernet's weights and its row masks.
3. **Retrain** (``CompactEmbeddingBag``, ``stage: compact``): kept rows only, renumbered
   ``1..K`` (row 0 is the pruned rows' zero vector), each table at its searched width. The id
   remap is the pure KJT → KJT function ``remap_ids`` that export and serving reuse.

Tables are torchrec ``EmbeddingCollection`` s (unpooled lookups), so DMP shards them; pooling is
done here, after masking. Sparsity follows PROTOCOLS.md::

    1 − Σ_t kept_rows_t · dims_t / Σ_t rows_t · D

Example (YAML, under ``model.init_args`` of ``recsys.models.base.EmbeddingMLP``)::

    optembed: {stage: supernet, alpha: 1.0e-5, threshold_lr: 1.0e-2}
    optembed: {stage: compact, artifact: runs/optembed/ml100k/s1/search}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recsys.embedding.tables import POOLINGS, table_device

STAGES = ("supernet", "compact")
ARTIFACT = "optembed.pt"  # inside the search output directory


@dataclass
class OptEmbedSpec:
    """OptEmbed configuration.

    Attributes:
        stage: ``supernet`` (train masks and thresholds) or ``compact`` (retrain the searched tables).
        alpha: weight of the threshold regularizer ``α · Σ_t exp(−t_t)``.
        threshold_init: initial threshold of every table (0: every row kept at the start).
        threshold_lr: learning rate of the thresholds (their own optimizer parameter group).
        prune_rows: OptEmbed-E (row pruning); false trains dims only.
        sample_dims: OptEmbed-D (sampled dims in supernet training); false trains row masks only.
        artifact: ``compact``: the directory ``recsys optembed search`` wrote (``optembed.pt``).
        warm_start: ``compact``: start retraining from the supernet's weights (kept rows, searched
            dims, its MLP) instead of a fresh initialization (the paper retrains from scratch).
        dims, kept_rows: ``compact``: per-table width and kept row count. Filled from the artifact
            and saved in checkpoints, so a compact checkpoint loads without the artifact.
    """

    stage: str = "supernet"
    alpha: float = 1e-5
    threshold_init: float = 0.0
    threshold_lr: float = 1e-2
    prune_rows: bool = True
    sample_dims: bool = True
    artifact: str | None = None
    warm_start: bool = False
    dims: dict[str, int] = field(default_factory=dict)
    kept_rows: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"optembed.stage must be one of {STAGES}, got {self.stage!r}")
        if self.alpha < 0 or self.threshold_lr <= 0:
            raise ValueError(f"optembed.alpha must be >= 0 and threshold_lr > 0, got {self.alpha}, {self.threshold_lr}")
        if self.stage == "compact" and self.artifact is None and not self.dims:
            raise ValueError("optembed.stage=compact needs optembed.artifact (the `recsys optembed search` output dir)")


# -- building blocks ----------------------------------------------------------------------------
class _StepSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(x)
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        (x,) = ctx.saved_tensors
        a = x.abs()
        scale = torch.where(a <= 0.4, 2 - 4 * a, torch.where(a <= 1.0, torch.full_like(a, 0.4), torch.zeros_like(a)))
        return grad * scale


def step_ste(x: torch.Tensor) -> torch.Tensor:
    """Unit step ``x > 0`` forward; backward ``2 − 4|x|`` for ``|x| ≤ 0.4``, ``0.4`` for ``|x| ≤ 1``, else 0
    (the official OptEmbed estimator)."""
    return _StepSTE.apply(x)


def pool_jagged(values: torch.Tensor, lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    """``[N, D]`` rows of ``B`` bags (``lengths [B]``) → ``[B, D]`` sum or mean (empty bag → zeros),
    what torchrec's ``EmbeddingBagCollection`` computes."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {sorted(POOLINGS)}, got {pooling!r}")
    bags = lengths.numel()
    segment = torch.repeat_interleave(torch.arange(bags, device=values.device), lengths, output_size=values.shape[0])
    out = values.new_zeros(bags, values.shape[1]).index_add(0, segment, values)
    if pooling == "mean":
        out = out / lengths.clamp(min=1).unsqueeze(1).to(values.dtype)
    return out


def sample_dims(batch_size: int, num_tables: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """OptEmbed-D: ``[B, T]`` dims drawn uniformly from ``1..dim`` (torch's global generator)."""
    return torch.randint(1, dim + 1, (batch_size, num_tables), device=device)


def prefix_mask(dims: torch.Tensor, dim: int) -> torch.Tensor:
    """``dims [..., T]`` → float mask ``[..., T, dim]`` keeping the first ``dims`` columns."""
    return (torch.arange(dim, device=dims.device) < dims.unsqueeze(-1)).float()


def compact_remap(kept: torch.Tensor) -> torch.Tensor:
    """Row map of one table: kept row ``i`` → ``1..K`` in order, pruned rows → 0 (the zero row)."""
    remap = torch.zeros(kept.numel(), dtype=torch.int64)
    remap[kept] = torch.arange(1, int(kept.sum()) + 1)
    return remap


def remap_ids(kjt: KeyedJaggedTensor, maps: dict[str, torch.Tensor]) -> KeyedJaggedTensor:
    """KJT → KJT: every feature's ids through its table's row map (``compact_remap``); lengths unchanged."""
    values = kjt.values()
    if values.numel() == 0:
        return kjt
    parts = values.split(kjt.length_per_key())
    remapped = torch.cat([maps[key][part] for key, part in zip(kjt.keys(), parts, strict=True)])
    return KeyedJaggedTensor(keys=kjt.keys(), values=remapped, lengths=kjt.lengths(), stride=kjt.stride())


def sparsity(kept_rows: dict[str, int], dims: dict[str, int], rows: dict[str, int], dim: int) -> float:
    """PROTOCOLS.md: ``1 − Σ_t kept_rows_t · dims_t / Σ_t rows_t · D``."""
    return 1.0 - sum(kept_rows[t] * dims[t] for t in rows) / sum(rows[t] * dim for t in rows)


def _readers(owners: dict[str, str]) -> dict[str, list[str]]:
    """Table owner → the features reading it, in ``owners`` order."""
    readers: dict[str, list[str]] = {}
    for feature, owner in owners.items():
        readers.setdefault(owner, []).append(feature)
    return readers


# -- stage 1: supernet --------------------------------------------------------------------------
class OptEmbedBag(nn.Module):
    """Pooled embeddings with learnable row masks and sampled dims: KJT in, KeyedTensor out.

    Args:
        owners: feature → table-owning feature (sequences read their target's table).
        rows: owner → table rows.
        dim: full width ``D`` of every table.
        pooling: ``sum`` or ``mean`` (pruned rows count as zero vectors).
        spec: thresholds, regularizer, which of E / D is on.
    """

    def __init__(self, owners: dict[str, str], rows: dict[str, int], dim: int, pooling: str, spec: OptEmbedSpec) -> None:
        super().__init__()
        self.owners, self.dim, self.pooling, self.spec = dict(owners), dim, pooling, spec
        readers = _readers(self.owners)
        self.table_owners = list(readers)
        self.index = {o: i for i, o in enumerate(self.table_owners)}
        self.rows = {o: rows[o] for o in self.table_owners}
        self.tables = EmbeddingCollection(
            tables=[EmbeddingConfig(name=f"t_{o}", embedding_dim=dim, num_embeddings=rows[o], feature_names=readers[o])
                    for o in self.table_owners],
            device=table_device(),
        )
        self.threshold = nn.Parameter(torch.full((len(self.table_owners),), float(spec.threshold_init)))
        self.register_buffer("eval_dims", torch.full((len(self.table_owners),), dim, dtype=torch.int64))

    def output_dims(self) -> dict[str, int]:
        return {f: self.dim for f in self.owners}

    def weight(self, owner: str) -> torch.Tensor:
        return self.tables.embeddings[f"t_{owner}"].weight

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedTensor:
        looked = self.tables(kjt)
        batch = kjt.stride()
        if self.training and self.spec.sample_dims:
            keep = prefix_mask(sample_dims(batch, len(self.table_owners), self.dim, self.threshold.device), self.dim)
        elif bool((self.eval_dims < self.dim).any()):
            keep = prefix_mask(self.eval_dims, self.dim).expand(batch, -1, -1)
        else:
            keep = None
        blocks = []
        for feature in kjt.keys():
            i = self.index[self.owners[feature]]
            rows = looked[feature].values()
            if self.spec.prune_rows:
                rows = rows * step_ste(rows.abs().sum(1) - self.threshold[i]).unsqueeze(1)
            pooled = pool_jagged(rows, looked[feature].lengths(), self.pooling)
            blocks.append(pooled if keep is None else pooled * keep[:, i])
        return KeyedTensor.from_tensor_list(list(kjt.keys()), blocks)

    def regularization(self) -> torch.Tensor:
        if not self.spec.prune_rows:
            return self.threshold.sum() * 0.0
        return self.spec.alpha * torch.exp(-self.threshold).sum()

    @torch.no_grad()
    def row_masks(self) -> dict[str, torch.Tensor]:
        """Owner → bool ``[rows]``: the rows the learned thresholds keep."""
        if not self.spec.prune_rows:
            return {o: torch.ones(self.rows[o], dtype=torch.bool) for o in self.table_owners}
        return {o: (self.weight(o).abs().sum(1) - self.threshold[self.index[o]] > 0).cpu() for o in self.table_owners}

    def set_eval_dims(self, dims: dict[str, int] | None) -> None:
        """Dims used outside training (None: all ``D``); the search scores candidates with it."""
        values = [self.dim if dims is None else int(dims[o]) for o in self.table_owners]
        if any(not 1 <= v <= self.dim for v in values):
            raise ValueError(f"dims must lie in 1..{self.dim}, got {values}")
        self.eval_dims.copy_(torch.tensor(values))


# -- stage 3: compact tables --------------------------------------------------------------------
def load_artifact(path: str | Path) -> dict:
    """The search result: ``{"dim", "dims", "kept", "rows", ...}`` (``kept``: owner → bool ``[rows]``)."""
    file = Path(path) / ARTIFACT if Path(path).is_dir() else Path(path)
    if not file.exists():
        raise FileNotFoundError(f"{file}: OptEmbed search artifact not found (run `recsys optembed search` first)")
    artifact = torch.load(file, map_location="cpu", weights_only=True)
    missing = {"dim", "dims", "kept"} - set(artifact)
    if missing:
        raise ValueError(f"{file}: not an OptEmbed artifact (missing {sorted(missing)})")
    return artifact


class CompactEmbeddingBag(nn.Module):
    """Retrained OptEmbed tables: ids remapped to kept rows, each table at its own width.

    Table ``t`` has ``kept_rows_t + 1`` rows × ``dims_t``; row 0 is the zero vector every pruned id
    reads (it is masked, so it stays zero and gets no gradient). Tables of equal width share one
    ``EmbeddingCollection`` (torchrec requires one width per collection).

    Args:
        owners: feature → table-owning feature.
        rows: owner → rows of the original table (size of the remap).
        dims, kept_rows: owner → searched width and kept row count.
        pooling: ``sum`` or ``mean``.
        kept: owner → bool ``[rows]`` to build the remaps from (omit when a state dict follows).
    """

    def __init__(self, owners: dict[str, str], rows: dict[str, int], dims: dict[str, int], kept_rows: dict[str, int],
                 pooling: str, kept: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.owners, self.pooling = dict(owners), pooling
        readers = _readers(self.owners)
        self.dims = {o: int(dims[o]) for o in readers}
        self.kept_rows = {o: int(kept_rows[o]) for o in readers}
        self.remaps = nn.Module()
        for owner in readers:
            remap = torch.zeros(rows[owner], dtype=torch.int64) if kept is None else compact_remap(kept[owner])
            if kept is not None and int(kept[owner].sum()) != self.kept_rows[owner]:
                raise ValueError(f"table {owner!r}: the row mask keeps {int(kept[owner].sum())} rows, expected {self.kept_rows[owner]}")
            self.remaps.register_buffer(owner, remap)
        groups: dict[int, list[str]] = {}
        for owner in readers:
            groups.setdefault(self.dims[owner], []).append(owner)
        self.group_features = {f"d{d}": [f for o in owners_ for f in readers[o]] for d, owners_ in groups.items()}
        self.tables = nn.ModuleDict({
            f"d{d}": EmbeddingCollection(
                tables=[EmbeddingConfig(name=f"t_{o}", embedding_dim=d, num_embeddings=self.kept_rows[o] + 1,
                                        feature_names=readers[o]) for o in owners_],
                device=table_device(),
            )
            for d, owners_ in groups.items()
        })
        with torch.no_grad():
            for owner in readers:
                self.weight(owner)[0].zero_()

    @property
    def num_parameters(self) -> int:
        return sum((self.kept_rows[o] + 1) * self.dims[o] for o in self.dims)

    def output_dims(self) -> dict[str, int]:
        return {f: self.dims[o] for f, o in self.owners.items()}

    def weight(self, owner: str) -> torch.Tensor:
        return self.tables[f"d{self.dims[owner]}"].embeddings[f"t_{owner}"].weight

    def row_maps(self) -> dict[str, torch.Tensor]:
        """Feature → its table's row map (the argument of ``remap_ids``)."""
        return {f: getattr(self.remaps, o) for f, o in self.owners.items()}

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedTensor:
        ids = remap_ids(kjt, self.row_maps()).to_dict()
        pooled = {}
        for group, features in self.group_features.items():
            present = [f for f in features if f in ids]
            if not present:
                continue
            looked = self.tables[group](KeyedJaggedTensor.from_jt_dict({f: ids[f] for f in present}))
            for f in present:
                rows = looked[f].values() * (ids[f].values() != 0).unsqueeze(1).to(looked[f].values().dtype)
                pooled[f] = pool_jagged(rows, looked[f].lengths(), self.pooling)
        keys = list(kjt.keys())
        return KeyedTensor.from_tensor_list(keys, [pooled[f] for f in keys])
