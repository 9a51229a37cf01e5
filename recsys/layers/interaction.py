"""Feature interactions over per-field vectors ``[B, F, D]``.

``dot_interaction`` is DLRM's pairwise dot products; ``FieldProjection`` brings fields of
different widths (what a table kind or a text column may give) to the one width those
interactions need.

Example::

    fields = FieldProjection({"user_id": 16, "genres": 32}, dim=16)(embedded.pooled)   # [B, 2, 16]
    pairs = dot_interaction(fields)                                                      # [B, 1]
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def dot_interaction(vectors: Tensor) -> Tensor:
    """``[B, F, D]`` → ``[B, F(F−1)/2]``: ``<v_i, v_j>`` for every pair ``i < j`` (row-major)."""
    num = vectors.shape[1]
    gram = torch.bmm(vectors, vectors.transpose(1, 2))  # [B, F, F]
    i, j = torch.triu_indices(num, num, offset=1, device=vectors.device)
    return gram[:, i, j]


class FieldProjection(nn.Module):
    """``{field: [B, W_f]}`` → ``[B, F, dim]`` in ``widths``' order: a field already ``dim`` wide passes
    as it is, any other goes through its own linear map (no bias) to ``dim``."""

    def __init__(self, widths: dict[str, int], dim: int) -> None:
        super().__init__()
        self.fields = list(widths)
        self.project = nn.ModuleDict({f: nn.Linear(w, dim, bias=False) for f, w in widths.items() if w != dim})

    def forward(self, fields: dict[str, Tensor]) -> Tensor:
        return torch.stack([self.project[f](fields[f]) if f in self.project else fields[f] for f in self.fields], dim=1)
