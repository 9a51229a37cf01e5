"""Mini-batch aware L2 regularization (DIN paper, section 4.3).

For every id j that occurs in the mini-batch (once, however often it occurs)::

    penalty = λ · Σ_j ||w_j||² / n_j

with n_j the id's number of occurrences in the train split (from the dataset's vocabulary), so
frequent ids are shrunk less per batch than rare ones, and rows absent from the batch are not
touched (plain L2 over the whole table would cost a pass over every row at every step).
"""

from __future__ import annotations

import torch
from torch import Tensor


def mba_penalty(weight: Tensor, ids: Tensor, inverse_counts: Tensor, strength: float) -> Tensor:
    """``strength · Σ_{j ∈ unique(ids)} ||weight[j]||² · inverse_counts[j]`` (a scalar)."""
    if ids.numel() == 0:
        return weight.new_zeros(())
    unique = torch.unique(ids)
    rows = weight.index_select(0, unique)
    return strength * (rows.pow(2).sum(1) * inverse_counts.index_select(0, unique)).sum()


def mba_penalty_from_lookups(embeddings: Tensor, ids: Tensor, inverse_counts: Tensor, strength: float) -> Tensor:
    """The same penalty computed from looked-up rows ``embeddings [N, D]`` of ``ids [N]``.

    Each occurrence of id j carries ``1 / (n_j · c_j)`` with c_j its occurrences in the batch, so
    the sum over occurrences is ``Σ_j ||w_j||² / n_j`` and the gradient reaching row j is exactly
    ``2λ w_j / n_j``. It needs no access to the table, so it works on sharded tables (FBGEMM's
    fused backward receives it like any other gradient of the lookups).
    """
    if ids.numel() == 0:
        return embeddings.new_zeros(())
    _, position, occurrences = torch.unique(ids, return_inverse=True, return_counts=True)
    weight = inverse_counts.index_select(0, ids) / occurrences.index_select(0, position).to(embeddings.dtype)
    return strength * (embeddings.pow(2).sum(1) * weight).sum()


def inverse_counts(counts: Tensor) -> Tensor:
    """1 / max(n_j, 1): the OOV row and ids missing from train count as seen once."""
    return 1.0 / counts.clamp(min=1).to(torch.float32)


def table_counts(vocab_counts: Tensor, transform, remap: Tensor | None, rows: int) -> Tensor:  # noqa: ANN001
    """Train occurrences of each table row: the vocabulary rows' counts summed into the rows their
    ids map to (``transform``: a ``recsys.embedding.transforms.Transform``), so a shared (hashed or
    unified) row counts every id that lands in it, and a compact OptEmbed row its kept id."""
    ids = torch.arange(len(vocab_counts))
    return torch.bincount(transform(ids, remap), weights=vocab_counts.to(torch.float64), minlength=rows).float()
