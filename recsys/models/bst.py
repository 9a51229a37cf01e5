"""BST: the Behavior Sequence Transformer (Chen et al., 2019).

::

    target ids (item_id, genre) ─┐                                ┌─▶ target [B, W]
    behavior sequences ──────────┴─▶ EmbeddingLayer, row by row ──┤   (a sequence reads its target's table)
                                       (any table kind, ⊕ text)   └─▶ behaviors [N, W], lengths [B]
         tokens [target, most recent, …, oldest] ─▶ project to d + position (0 = target) ─▶ transformer
             encoder (padding masked) ─▶ target token ⊕ mean of tokens [B, 2d]   (per attention group)
    other ids ─▶ EmbeddingLayer, pooled ─▶ [B, Σ W_f];  numeric ─▶ [B, n]
                              concat(pooled, encoded groups, numeric) ─▶ MLP ─▶ logit

Sequences in one group are concatenated per behavior (item ⊕ genre), as DIN does; positions are the
recency rank (the schema has no per-behavior timestamps).
"""

from __future__ import annotations

from typing import Any

import torch

from recsys.data.vocab import DatasetInfo
from recsys.embedding.layer import Embedded
from recsys.layers.mlp import MLP
from recsys.layers.sequence import SequenceTransformer
from recsys.train.module import CTRModule


class BST(CTRModule):
    """Behavior Sequence Transformer over any dataset whose schema declares ``sequence`` features.

    Args:
        features: dataset info (linked from the data module by the CLI).
        transformer_dim, transformer_heads, transformer_layers, transformer_dropout: the encoder.
        transformer_norm_first: layer norm before attention and the feed-forward, plus a final one
            (pre-LN), instead of after each residual sum (post-LN, the paper's).
        attention_groups: lists of sequence features encoded together; default all in one.
        dnn_hidden_units, dnn_activation, dnn_dropout: the prediction MLP.
        **kwargs: ``embedding``, ``text``, ``mba_lambda``, ``optimizer``.

    Example::

        model = BST(datamodule.dataset_info, transformer_dim=32, transformer_heads=2)
        logits = model(batch)       # [B]
    """

    def __init__(
        self,
        features: DatasetInfo | dict,
        transformer_dim: int = 32,
        transformer_heads: int = 2,
        transformer_layers: int = 1,
        transformer_dropout: float = 0.1,
        transformer_norm_first: bool = False,
        attention_groups: list[list[str]] | None = None,
        dnn_hidden_units: list[int] = [200, 80],  # noqa: B006
        dnn_activation: str = "relu",
        dnn_dropout: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(features, **kwargs)
        self.target_of, self.groups = self.schema.sequence_groups(attention_groups, "BST")
        targets = list(dict.fromkeys(self.target_of.values()))
        self.embedding = self.embedding_layer(jagged=[*targets, *self.target_of])
        width = self.embedding.output_dims()
        self.pooled = self.embedding.pooled_features
        self.encoders = torch.nn.ModuleList(
            SequenceTransformer(
                sum(width[s] for s in group),
                transformer_dim,
                transformer_heads,
                transformer_layers,
                transformer_dropout,
                max(self.schema[s].max_len for s in group),
                transformer_norm_first,
            )
            for group in self.groups
        )
        inputs = sum(width[f] for f in self.pooled) + 2 * transformer_dim * len(self.groups) + len(self.schema.numeric)
        self.dnn = MLP(inputs, dnn_hidden_units, 1, dnn_activation, dnn_dropout)

    @property
    def aligned_sequences(self) -> list[list[str]]:
        """Sequences read together behavior by behavior: each row's must have equal lengths."""
        return [group for group in self.groups if len(group) > 1]

    def head(self, embedded: Embedded, dense: torch.Tensor) -> torch.Tensor:
        parts = [embedded.cat(self.pooled)] if self.pooled else []
        for encoder, group in zip(self.encoders, self.groups, strict=True):
            lengths = embedded.jagged[group[0]].lengths()
            if any(not torch.equal(embedded.jagged[s].lengths(), lengths) for s in group[1:]):
                raise ValueError(f"sequences {group} are encoded together but differ in length; set attention_groups")
            target = torch.cat([embedded.jagged[self.target_of[s]].values() for s in group], dim=1)  # [B, W]
            behaviors = torch.cat([embedded.jagged[s].values() for s in group], dim=1)  # [N, W]
            parts.append(encoder(target, behaviors, lengths))
        parts.append(dense)
        return self.dnn(torch.cat(parts, dim=1)).squeeze(-1)
