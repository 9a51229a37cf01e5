"""The Behavior Sequence Transformer's encoder over jagged behaviors (Chen et al., 2019).

A row's target item is put in front of its behaviors, most recent first: tokens
``[target, b_n, b_{n−1}, …, b_1]`` with ordinal positions ``0, 1, 2, …`` (the schema has no per-behavior
timestamps, so the position is the recency rank). The tokens are projected to ``dim``, a learned
position embedding is added, and a transformer encoder runs over them. Rows are padded to the
batch's longest for the encoder, and padding never attends or is attended to (a key padding mask);
``tests/layers/test_sequence.py`` checks the batch against each row encoded alone, without padding.

Example::

    encoder = SequenceTransformer(in_features=16, dim=32, heads=2, layers=1, max_len=50)
    out = encoder(target [B, 16], behaviors [N, 16], lengths [B])     # [B, 64]: target token ⊕ mean of tokens
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from recsys.data.batch import jagged_rows


def jagged_to_padded(values: Tensor, lengths: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Jagged rows ``values [N, D]`` (``lengths [B]``, oldest first) → ``[B, width, D]`` most recent first,
    left-aligned, zero-padded, and the validity mask ``[B, width]``."""
    batch = lengths.numel()
    rows = jagged_rows(lengths, values.shape[0])
    starts = torch.cumsum(lengths.long(), 0) - lengths.long()
    within = torch.arange(values.shape[0], device=values.device) - starts[rows]  # 0 = oldest
    column = lengths.long()[rows] - 1 - within  # 0 = most recent
    padded = values.new_zeros(batch, width, values.shape[1])
    padded[rows, column] = values
    mask = torch.arange(width, device=values.device) < lengths.unsqueeze(1)
    return padded, mask


class SequenceTransformer(nn.Module):
    """``(target [B, D_in], behaviors [N, D_in], lengths [B]) → [B, 2·dim]``: the encoded target token
    ⊕ the mean of all encoded tokens of the row.

    Args:
        in_features: width of a behavior (and of the target).
        dim: the transformer's width (tokens are projected to it, so any table kind's width works).
        heads, layers, dropout: of the encoder (``dim`` must be divisible by ``heads``).
        max_len: most behaviors per row (positions 0..max_len).
        norm_first: pre-LN layers (norm before attention and the feed-forward) and a final norm;
            default post-LN (norm after each residual sum), as in the BST paper.
    """

    def __init__(
        self,
        in_features: int,
        dim: int = 32,
        heads: int = 2,
        layers: int = 1,
        dropout: float = 0.1,
        max_len: int = 50,
        norm_first: bool = False,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"transformer_dim {dim} must be divisible by transformer_heads {heads}")
        self.max_len = max_len
        self.project = nn.Linear(in_features, dim)
        self.position = nn.Embedding(max_len + 1, dim)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=4 * dim, dropout=dropout, batch_first=True, norm_first=norm_first
        )
        final = nn.LayerNorm(dim) if norm_first else None
        self.encoder = nn.TransformerEncoder(layer, layers, norm=final, enable_nested_tensor=False)

    def forward(self, target: Tensor, behaviors: Tensor, lengths: Tensor) -> Tensor:
        width = int(lengths.max()) if lengths.numel() else 0
        if width > self.max_len:
            raise ValueError(
                f"a row has {width} behaviors; this encoder has positions for {self.max_len} (the schema's max_len)"
            )
        padded, mask = jagged_to_padded(behaviors, lengths, width)
        tokens = torch.cat([target.unsqueeze(1), padded], dim=1)  # [B, 1 + L, D_in]
        valid = torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1)  # the target is always there
        x = self.project(tokens) + self.position(torch.arange(tokens.shape[1], device=tokens.device))
        padding = None if bool(valid.all()) else ~valid  # (torch's fast path rejects an all-valid [B, 1] mask)
        encoded = self.encoder(x, src_key_padding_mask=padding)  # [B, 1 + L, dim]
        weights = valid.unsqueeze(-1).to(encoded.dtype)
        mean = (encoded * weights).sum(1) / weights.sum(1)
        return torch.cat([encoded[:, 0], mean], dim=1)
