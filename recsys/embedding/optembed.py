"""OptEmbed (Lyu et al. 2022): learnable row pruning + per-table dimension search → compact tables.

The building blocks; the ``optembed`` kind of ``recsys.embedding.layer.EmbeddingLayer`` uses them,
so every model gets OptEmbed. Three stages, each a separate run (``recsys optembed run`` runs all
three; ``docs/optembed.md`` walks through them):

1. **Supernet** (``embedding: {kind: optembed, stage: supernet}``). A looked-up row ``e`` of table
   ``t`` is kept iff ``‖e‖₁ − t_t > 0``: the forward is that unit step, the backward a
   straight-through estimator (``step_ste``). The loss gains ``α · Σ_t exp(−t_t)``, which pushes
   thresholds up; thresholds train with their own learning rate. Masks act on looked-up rows
   *before* pooling, so multi-hot lists and sequences are pruned row by row. In training every
   sample draws, per table, a width ``d ∈ {1..D_t}`` uniformly and keeps that prefix (OptEmbed-D);
   the draw hashes the sample's position in its split with a per-step salt (``sample_dims``), so it
   does not depend on how a batch is split over ranks. Evaluation uses ``eval_dims``.
2. **Search** (``recsys optembed search``): evolutionary search over per-table widths on the val
   split with the supernet's weights and row masks (``recsys.train.optembed``).
3. **Retrain** (``stage: compact``): kept rows only, renumbered ``1..K`` (row 0 is the pruned
   rows' zero vector), each table at its searched width. The id remap is the pure KJT → KJT
   function ``remap_ids`` that export and serving reuse.

Sparsity follows the OptEmbed paper::

    1 − Σ_t kept_rows_t · dims_t / Σ_t rows_t · D
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.embedding.hashing import feature_salt, hash_to_rows

ARTIFACT = "optembed.pt"  # inside the search output directory


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


def sample_dims(positions: torch.Tensor | None, batch_size: int, full_dims: torch.Tensor, step: int) -> torch.Tensor:
    """OptEmbed-D: ``[B, T]`` widths, table ``t``'s drawn uniformly from ``1..full_dims[t]``.

    With row ``positions`` (``Batch.positions``) the draw is a hash of (position, table, ``step``):
    a sample gets the same widths whichever rank or batch share it lands in. Without positions
    (hand-made batches) torch's global generator draws them.
    """
    device = full_dims.device
    if positions is None:
        return (torch.rand(batch_size, len(full_dims), device=device) * full_dims).long() + 1
    columns = [
        hash_to_rows(positions.to(device), feature_salt(f"optembed-dims#{t}", step), int(d)) + 1
        for t, d in enumerate(full_dims.tolist())
    ]
    return torch.stack(columns, dim=1)


def prefix_mask(dims: torch.Tensor, width: int) -> torch.Tensor:
    """``dims [...]`` → float mask ``[..., width]`` keeping the first ``dims`` columns."""
    return (torch.arange(width, device=dims.device) < dims.unsqueeze(-1)).float()


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


def sparsity(kept_rows: dict[str, int], dims: dict[str, int], rows: dict[str, int], full_dims: dict[str, int]) -> float:
    """``1 − Σ_t kept_rows_t · dims_t / Σ_t rows_t · D_t`` (the paper's, with a full width per table)."""
    return 1.0 - sum(kept_rows[t] * dims[t] for t in rows) / sum(rows[t] * full_dims[t] for t in rows)


def load_artifact(path: str | Path) -> dict:
    """The search result ``{"dims", "kept", ...}`` (``kept``: owner → bool ``[rows]``); tensors only."""
    file = Path(path) / ARTIFACT if Path(path).is_dir() else Path(path)
    if not file.exists():
        raise FileNotFoundError(f"{file}: OptEmbed search artifact not found (run `recsys optembed search` first)")
    artifact = torch.load(file, map_location="cpu", weights_only=True)
    missing = {"dims", "kept"} - set(artifact)
    if missing:
        raise ValueError(f"{file}: not an OptEmbed artifact (missing {sorted(missing)})")
    return artifact


class Supernet(nn.Module):
    """OptEmbed supernet state of a layer's ``optembed`` tables: a learnable threshold per table, the
    widths used outside training, and the count of training draws (the per-step salt of the widths).

    Args:
        owners: the table-owning features whose tables are supernet tables.
        full_dims: each table's full width ``D_t``.
        alpha, threshold_init, threshold_lr, prune_rows, sample_dims: the ``embedding`` block's keys.
    """

    def __init__(
        self,
        owners: list[str],
        full_dims: list[int],
        alpha: float,
        threshold_init: float,
        threshold_lr: float,
        prune_rows: bool,
        sample_dims: bool,
    ) -> None:
        super().__init__()
        self.owners, self.index = list(owners), {o: i for i, o in enumerate(owners)}
        self.alpha, self.threshold_lr, self.prune_rows, self.sample = alpha, threshold_lr, prune_rows, sample_dims
        self.threshold = nn.Parameter(torch.full((len(owners),), float(threshold_init)))
        full = torch.tensor(full_dims)
        self.register_buffer("full_dims", full, persistent=False)
        self.register_buffer("eval_dims", full.clone())
        self.register_buffer("draws", torch.zeros((), dtype=torch.int64))

    def widths(self, positions: torch.Tensor | None, batch_size: int) -> torch.Tensor | None:
        """``[B, T]`` widths per sample and table: drawn in training, else ``eval_dims`` when narrowed."""
        if self.training and self.sample:
            self.draws += 1
            return sample_dims(positions, batch_size, self.full_dims, int(self.draws))
        if bool((self.eval_dims < self.full_dims).any()):
            return self.eval_dims.expand(batch_size, -1)
        return None

    def mask(
        self, owner: str, values: torch.Tensor, lengths: torch.Tensor, widths: torch.Tensor | None
    ) -> torch.Tensor:
        """Looked-up rows ``[N, D]`` of ``owner``'s table (``lengths [B]`` per sample): rows under the
        threshold read as zeros (straight-through), columns past the sample's width too."""
        i = self.index[owner]
        if self.prune_rows:
            values = values * step_ste(values.abs().sum(1) - self.threshold[i]).unsqueeze(1)
        if widths is not None:
            per_row = torch.repeat_interleave(widths[:, i], lengths.long(), output_size=values.shape[0])
            values = values * prefix_mask(per_row, values.shape[1])
        return values

    def regularization(self) -> torch.Tensor | float:
        return self.alpha * torch.exp(-self.threshold).sum() if self.prune_rows else 0.0

    def parameter_groups(self) -> list[dict]:
        return [{"params": [self.threshold], "lr": self.threshold_lr, "weight_decay": 0.0}]

    def set_eval_dims(self, dims: dict[str, int] | None) -> None:
        """Widths used outside training (None: full); the widths search scores candidates with it."""
        values = [int(self.full_dims[i]) if dims is None else int(dims[o]) for i, o in enumerate(self.owners)]
        if any(not 1 <= v <= int(d) for v, d in zip(values, self.full_dims.tolist(), strict=True)):
            raise ValueError(f"dims must lie in 1..{self.full_dims.tolist()}, got {values}")
        self.eval_dims.copy_(torch.tensor(values))

    @torch.no_grad()
    def row_masks(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Owner → bool ``[rows]``: the rows of ``weights[owner]`` its threshold keeps."""
        if not self.prune_rows:
            return {o: torch.ones(weights[o].shape[0], dtype=torch.bool) for o in self.owners}
        return {o: (weights[o].abs().sum(1) - self.threshold[self.index[o]] > 0).cpu() for o in self.owners}
