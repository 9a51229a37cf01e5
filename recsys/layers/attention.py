"""DIN target attention (the paper's "local activation unit") over jagged behavior sequences.

For a row with target embedding q and behaviors k_1..k_n (no padding: values + lengths)::

    a_i = MLP([q, k_i, q − k_i, q ⊙ k_i])          one weight per behavior
    interest = Σ_i a_i · k_i                       (softmax over i optional; the paper uses none)

The first layer is evaluated in an equivalent, cheaper form: with W = [W_q | W_k | W_d | W_p],
W·[q, k, q−k, q⊙k] = (W_q + W_d)·q + (W_k − W_d)·k + W_p·(q⊙k), so the q term is computed once
per row instead of once per behavior. ``tests/layers/test_attention.py`` checks it against a
plain per-row implementation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from recsys.data.batch import jagged_rows
from recsys.layers.activations import make_activation
from recsys.layers.mlp import MLP


def segment_softmax(scores: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    """Softmax of ``scores [N]`` within each row's segment."""
    peak = torch.full((num_rows,), float("-inf"), dtype=scores.dtype, device=scores.device)
    peak = peak.scatter_reduce(0, rows, scores, reduce="amax", include_self=True)
    exp = torch.exp(scores - peak[rows])
    total = torch.zeros(num_rows, dtype=scores.dtype, device=scores.device).index_add(0, rows, exp)
    return exp / total[rows]


def padded_to_jagged(padded: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``[B, L, D]`` with a ``[B, L]`` validity mask → (values ``[N, D]``, lengths ``[B]``).

    Valid positions must come first in each row (left-aligned), as in most padded pipelines.
    """
    lengths = mask.sum(1)
    return padded[mask.bool()], lengths


class TargetAttention(nn.Module):
    """Attention of one query per row over that row's jagged keys.

    Args:
        embedding_dim: D, the width of queries and keys.
        hidden_units: widths of the attention MLP (``attention_hidden_units``).
        activation: ``dice`` (paper), ``prelu``, ``relu``, ``sigmoid``...
        softmax: normalise the weights within each row (off in the paper).

    Shapes: ``query [B, D]``, ``keys [N, D]`` with ``lengths [B]`` (Σ lengths = N) → ``[B, D]``.
    A row with no behaviors gets a zero vector.

    Example::

        attention = TargetAttention(32, [80, 40])
        interest = attention(query, keys, lengths)      # [B, 32]
    """

    def __init__(
        self,
        embedding_dim: int,
        hidden_units: Sequence[int] = (80, 40),
        activation: str = "dice",
        softmax: bool = False,
    ) -> None:
        super().__init__()
        if not hidden_units:
            raise ValueError("attention needs at least one hidden layer")
        self.embedding_dim = embedding_dim
        self.softmax = softmax
        self.first = nn.Linear(4 * embedding_dim, hidden_units[0])
        self.first_activation = make_activation(activation, hidden_units[0])
        self.rest = MLP(hidden_units[0], list(hidden_units[1:]), out_features=1, activation=activation)

    def scores(self, query: Tensor, keys: Tensor, rows: Tensor) -> Tensor:
        """Unnormalised weight of every behavior, ``[N]``."""
        w_q, w_k, w_d, w_p = self.first.weight.split(self.embedding_dim, dim=1)
        per_row = torch.addmm(self.first.bias, query, (w_q + w_d).t())  # [B, H]: once per row
        query_of_key = query.index_select(0, rows)  # [N, D]
        hidden = per_row.index_select(0, rows) + keys @ (w_k - w_d).t() + (query_of_key * keys) @ w_p.t()
        return self.rest(self.first_activation(hidden)).squeeze(-1)

    def forward(self, query: Tensor, keys: Tensor, lengths: Tensor) -> Tensor:
        rows = jagged_rows(lengths, keys.shape[0])
        weights = self.scores(query, keys, rows)
        if self.softmax:
            weights = segment_softmax(weights, rows, query.shape[0])
        out = torch.zeros_like(query)
        return out.index_add(0, rows, weights.unsqueeze(-1) * keys)
