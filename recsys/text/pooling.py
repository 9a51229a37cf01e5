"""Pooling heads: a transformer's token states → one vector per text, with exact masking.

Every head takes ``states`` ``[B, T, D]`` (or ``[L, B, T, D]``: all layers; single-layer heads
use the last) and ``mask`` ``[B, T]`` (1 = token, 0 = padding) and returns ``[B, D_out]``.
Padding never changes the result: pads are excluded from sums, maxima, attention and counts.

=============  ==========================================================================
``mean``       masked mean of the last layer
``cls``        the first token (BERT's [CLS])
``last``       the last real token (EOS pooling of decoder LLMs), whatever the padding side
``max``        masked per-dimension maximum
``gem``        generalized mean ``(mean x^p)^(1/p)`` with a learnable ``p`` (init 3); states are
               clamped at ``eps`` first (GeM needs positive inputs)
``attention``  one learnable query, scaled dot-product attention over the tokens
``latent``     NV-Embed's latent attention: tokens (queries) attend to a trainable latent array
               (keys = values), then a GELU MLP, then a masked mean over tokens
``multilayer`` per-layer masked means + layer embeddings, cross-attended by trainable latents,
               averaged over latents (needs all layers)
=============  ==========================================================================

Example::

    head = make_pooling("latent", dim=384, num_latents=64)
    vectors = head(hidden_states, attention_mask)      # [B, 384]
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _last_layer(states: Tensor) -> Tensor:
    return states[-1] if states.dim() == 4 else states


def _check(states: Tensor, mask: Tensor) -> Tensor:
    if states.dim() not in (3, 4):
        raise ValueError(f"states must be [B, T, D] or [L, B, T, D], got {tuple(states.shape)}")
    if mask.shape != states.shape[-3:-1]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match states {tuple(states.shape)}")
    if bool((mask.sum(1) == 0).any()):
        raise ValueError("every text needs at least one token (a row of the mask is all zeros)")
    return mask.to(states.dtype)


def masked_mean(states: Tensor, mask: Tensor) -> Tensor:
    """``[..., B, T, D]`` → ``[..., B, D]`` over the tokens where ``mask`` is 1."""
    weights = mask.to(states.dtype).unsqueeze(-1)
    return (states * weights).sum(-2) / weights.sum(-2).clamp(min=1)


def cross_attention(attention: nn.MultiheadAttention, queries: Tensor, keys: Tensor) -> Tensor:
    """``attention(queries, keys, keys)`` without dropout, written out from the module's weights so that
    batch dimensions broadcast: ``queries [..., Q, D]``, ``keys [..., K, D]`` → ``[..., Q, D]``.

    The heads' queries or keys are a shared parameter (latents): they are projected once, not once per
    text, and torch's fused CPU attention kernel (tiled for long sequences) is not used for the
    multilayer head's 4 latents over 7 layers, where the profile of a DIN step showed it as the
    largest attention cost. ``tests/text/test_pooling.py`` checks values and gradients against a
    per-text, per-head loop.
    """
    if attention.in_proj_weight is None or attention.bias_k is not None or attention.add_zero_attn or attention.dropout:
        raise ValueError(
            "cross_attention needs a MultiheadAttention with packed projections, no extra key bias, no dropout"
        )
    heads = attention.num_heads
    w_q, w_k, w_v = attention.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attention.in_proj_bias.chunk(3)
    q = nn.functional.linear(queries, w_q, b_q).unflatten(-1, (heads, -1))  # [..., Q, h, d]
    k = nn.functional.linear(keys, w_k, b_k).unflatten(-1, (heads, -1))  # [..., K, h, d]
    v = nn.functional.linear(keys, w_v, b_v).unflatten(-1, (heads, -1))
    weights = (torch.einsum("...qhd,...khd->...hqk", q, k) / math.sqrt(q.shape[-1])).softmax(-1)
    return attention.out_proj(torch.einsum("...hqk,...khd->...qhd", weights, v).flatten(-2))


class MeanPooling(nn.Module):
    def forward(self, states: Tensor, mask: Tensor) -> Tensor:
        _check(states, mask)
        return masked_mean(_last_layer(states), mask)


class FirstTokenPooling(nn.Module):
    def forward(self, states: Tensor, mask: Tensor) -> Tensor:
        _check(states, mask)
        return _last_layer(states)[:, 0]


class LastTokenPooling(nn.Module):
    def forward(self, states: Tensor, mask: Tensor) -> Tensor:
        _check(states, mask)
        states = _last_layer(states)
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (mask.long() * (positions + 1)).argmax(1)  # index of the last real token
        return states[torch.arange(states.shape[0], device=states.device), last]


class MaxPooling(nn.Module):
    def forward(self, states: Tensor, mask: Tensor) -> Tensor:
        _check(states, mask)
        states = _last_layer(states)
        return states.masked_fill(~mask.bool().unsqueeze(-1), float("-inf")).amax(1)


class GeMPooling(nn.Module):
    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, states: Tensor, mask: Tensor) -> Tensor:
        _check(states, mask)
        return self.from_logs(_last_layer(states).clamp(min=self.eps).log(), mask)

    def from_logs(self, logs: Tensor, mask: Tensor) -> Tensor:
        """The head from ``log(max(x, eps))`` ``[B, T, D]``: ``x^p = exp(p·log x)`` (item text caches the
        logs: they have no parameters, and the backward pass for ``p`` needs them)."""
        p = self.p.clamp(min=1.0)
        return masked_mean(torch.exp(p * logs), mask).pow(1.0 / p)


class AttentionPooling(nn.Module):
    """One learnable query; ``softmax(K q / √D)`` over the real tokens weights their states."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(dim) / math.sqrt(dim))

    def forward(self, states: Tensor, mask: Tensor) -> Tensor:
        _check(states, mask)
        states = _last_layer(states)
        scores = (states @ self.query) / math.sqrt(states.shape[-1])  # [B, T]
        scores = scores.masked_fill(~mask.bool(), float("-inf"))
        return (scores.softmax(1).unsqueeze(-1) * states).sum(1)


class LatentAttentionPooling(nn.Module):
    """NV-Embed (Lee et al. 2024): ``O = MHA(Q = tokens, K = V = latents)``, ``MLP(O)`` (two linear
    layers with GELU), then the masked mean over tokens."""

    def __init__(self, dim: int, num_latents: int = 64, heads: int = 4, hidden: int | None = None) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.latents = nn.Parameter(torch.randn(num_latents, dim) / math.sqrt(dim))
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden or dim), nn.GELU(), nn.Linear(hidden or dim, dim))

    def forward(self, states: Tensor, mask: Tensor) -> Tensor:
        _check(states, mask)
        text, position = mask.bool().nonzero(as_tuple=True)  # the real tokens, text by text
        return self.pool_tokens(_last_layer(states)[text, position], text, len(mask))

    def pool_tokens(self, tokens: Tensor, text: Tensor, texts: int) -> Tensor:
        """The head over real tokens only: ``tokens [n, D]`` of texts ``text [n]`` (0..texts−1, each text at
        least one token) → ``[texts, D]`` (each token attends alone, so no padding is needed; item text
        gathers its tokens straight from the cache)."""
        out = self.mlp(cross_attention(self.attention, tokens, self.latents))  # [n, D]
        sums = torch.zeros(texts, out.shape[1], dtype=out.dtype, device=out.device).index_add(0, text, out)
        return sums / torch.bincount(text, minlength=texts).unsqueeze(1).to(out.dtype)


class MultiLayerPooling(nn.Module):
    """Per-layer masked means plus a learned layer embedding, cross-attended by trainable latents
    (queries) over the layers, averaged over latents: which layers matter is learned."""

    def __init__(self, dim: int, num_layers: int, num_latents: int = 4, heads: int = 4) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.num_layers = num_layers
        self.layer_embedding = nn.Parameter(torch.zeros(num_layers, dim))
        self.latents = nn.Parameter(torch.randn(num_latents, dim) / math.sqrt(dim))
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, states: Tensor, mask: Tensor) -> Tensor:
        _check(states, mask)
        if states.dim() != 4 or states.shape[0] != self.num_layers:
            raise ValueError(
                f"multilayer pooling needs all {self.num_layers} layers [L, B, T, D], got {tuple(states.shape)}"
            )
        return self.attend(masked_mean(states, mask).transpose(0, 1))

    def attend(self, layers: Tensor) -> Tensor:
        """``[B, L, D]`` per-layer means → ``[B, D]`` (what follows the means; item text caches them)."""
        layers = layers + self.layer_embedding
        return cross_attention(self.attention, self.latents, layers).mean(-2)  # [B, k, D] → [B, D]


HEADS = ("mean", "cls", "last", "max", "gem", "attention", "latent", "multilayer")


def make_pooling(name: str, dim: int, num_layers: int | None = None, **kwargs) -> nn.Module:  # noqa: ANN003
    """A pooling head by name (see the module docstring); ``num_layers`` for ``multilayer``."""
    if name == "mean":
        return MeanPooling()
    if name == "cls":
        return FirstTokenPooling()
    if name == "last":
        return LastTokenPooling()
    if name == "max":
        return MaxPooling()
    if name == "gem":
        return GeMPooling(**kwargs)
    if name == "attention":
        return AttentionPooling(dim)
    if name == "latent":
        return LatentAttentionPooling(dim, **kwargs)
    if name == "multilayer":
        if num_layers is None:
            raise ValueError("multilayer pooling needs num_layers (hidden layers + embeddings)")
        return MultiLayerPooling(dim, num_layers, **kwargs)
    raise ValueError(f"unknown pooling {name!r}; choose one of {list(HEADS)}")
