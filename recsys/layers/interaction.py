"""Feature interactions: over per-field vectors ``[B, F, D]`` or one concatenated input ``[B, N]``.

==========================  ===============================================================================
``fm_interaction``           the factorization machine's Σ_{i<j} ⟨v_i, v_j⟩ in O(F·D): ½ Σ_d [(Σ_i v_id)² − Σ_i v_id²]
``dot_interaction``          DLRM: every ⟨v_i, v_j⟩, i < j, as features ``[B, F(F−1)/2]``
``cross_network``            DCN-V2's cross layers (torchrec's ``CrossNet`` / ``LowRankMixtureCrossNet``)
``FeatureGating``            FinalMLP's feature selection: x ⊙ 2σ(MLP(context))
``BilinearFusion``           FinalMLP's multi-head bilinear fusion of two streams
``FieldProjection``          fields of any width → one width (what a table kind or text may change)
==========================  ===============================================================================

Each has a plain reference in ``tests/layers/test_interaction.py`` (pairwise loops, the papers'
formulas), forward and backward.

Example::

    fields = FieldProjection({"user_id": 16, "genres": 32}, dim=16)(embedded.pooled)   # [B, 2, 16]
    fm = fm_interaction(fields)                                                          # [B]
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchrec.modules.crossnet import CrossNet, LowRankMixtureCrossNet

from recsys.layers.mlp import MLP


def fm_interaction(vectors: Tensor) -> Tensor:
    """``[B, F, D]`` → ``[B]``: Σ_{i<j} ⟨v_i, v_j⟩ (Rendle 2010), by the per-dimension sum-square form.

    torchrec's ``modules.deepfm.FactorizationMachine`` is not this: it flattens every scalar of every
    field and also multiplies across dimensions."""
    summed = vectors.sum(1)  # [B, D]
    return 0.5 * (summed.pow(2) - vectors.pow(2).sum(1)).sum(1)


def dot_interaction(vectors: Tensor) -> Tensor:
    """``[B, F, D]`` → ``[B, F(F−1)/2]``: ``<v_i, v_j>`` for every pair ``i < j`` (row-major)."""
    num = vectors.shape[1]
    gram = torch.bmm(vectors, vectors.transpose(1, 2))  # [B, F, F]
    i, j = torch.triu_indices(num, num, offset=1, device=vectors.device)
    return gram[:, i, j]


def cross_network(in_features: int, num_layers: int, low_rank: int | None = None, num_experts: int = 1) -> nn.Module:
    """DCN-V2's cross layers ``x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l`` on ``[B, in_features]``: full-rank
    ``W_l`` (torchrec ``CrossNet``), or a mixture of ``num_experts`` low-rank ``U V`` experts
    (``LowRankMixtureCrossNet``, the paper's DCN-Mix) when ``low_rank`` is given."""
    if low_rank is None:
        return CrossNet(in_features, num_layers)
    return LowRankMixtureCrossNet(in_features, num_layers, num_experts=num_experts, low_rank=low_rank)


class FeatureGating(nn.Module):
    """FinalMLP's feature selection: ``x ⊙ 2σ(MLP(c))``, with ``c`` the context fields' concatenation, or
    (no context) a learned vector: a per-stream, per-position reweighting of the input ``[B, N]``."""

    def __init__(self, in_features: int, context_features: int, hidden_units: list[int]) -> None:
        super().__init__()
        self.bias = (
            nn.Parameter(torch.ones(1, 1)) if context_features == 0 else None
        )  # (zeros: no first-layer gradient)
        self.gate = MLP(context_features or 1, hidden_units, in_features, "relu")

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = self.bias.expand(x.shape[0], -1) if self.bias is not None else context
        return x * 2 * torch.sigmoid(self.gate(context))


class BilinearFusion(nn.Module):
    """FinalMLP's multi-head bilinear fusion of two streams ``a [B, A]``, ``b [B, C]`` into a logit ``[B]``:
    split each into ``heads`` chunks and sum over heads ``w_aᵀ a_h + w_bᵀ b_h + a_hᵀ W_h b_h`` (+ a bias)."""

    def __init__(self, a_features: int, b_features: int, heads: int = 1) -> None:
        super().__init__()
        if a_features % heads or b_features % heads:
            raise ValueError(f"fusion heads {heads} must divide both stream widths ({a_features}, {b_features})")
        self.heads = heads
        self.linear_a = nn.Linear(a_features, 1)
        self.linear_b = nn.Linear(b_features, 1, bias=False)
        self.bilinear = nn.Parameter(torch.empty(heads, a_features // heads, b_features // heads))
        nn.init.xavier_uniform_(self.bilinear)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        a_heads = a.view(a.shape[0], self.heads, -1)  # [B, H, A/H]
        b_heads = b.view(b.shape[0], self.heads, -1)  # [B, H, C/H]
        pairwise = torch.einsum("bhi,hij,bhj->b", a_heads, self.bilinear, b_heads)
        return self.linear_a(a).squeeze(-1) + self.linear_b(b).squeeze(-1) + pairwise


class FieldProjection(nn.Module):
    """``{field: [B, W_f]}`` → ``[B, F, dim]`` in ``widths``' order: a field already ``dim`` wide passes
    as it is, any other goes through its own linear map (no bias) to ``dim``."""

    def __init__(self, widths: dict[str, int], dim: int) -> None:
        super().__init__()
        self.fields = list(widths)
        self.project = nn.ModuleDict({f: nn.Linear(w, dim, bias=False) for f, w in widths.items() if w != dim})

    def forward(self, fields: dict[str, Tensor]) -> Tensor:
        return torch.stack([self.project[f](fields[f]) if f in self.project else fields[f] for f in self.fields], dim=1)
