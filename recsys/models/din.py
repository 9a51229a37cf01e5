"""DIN: Deep Interest Network (Zhou et al., 2018).

::

    target ids (item_id, genre) ─┐                               ┌─▶ target embeddings [B, W]
    behavior sequences ──────────┴─▶ EmbeddingLayer, row by row ─┤   (a sequence reads its target's table)
      (hist_item_id, hist_genre)      (any table kind, ⊕ text)    └─▶ behaviors [N, W], lengths [B]
                                                                              │
                             query = target embeddings ──▶ TargetAttention ◀──┘
                                 a_i = MLP([q, k_i, q−k_i, q⊙k_i]),  interest = Σ a_i k_i   [B, W]
    other ids (user, gender, genres…) ─▶ EmbeddingLayer, pooled ─▶ [B, Σ W_f]
    numeric features ─────────────────────────────────────────────▶ dense [B, n_dense]
                       concat(pooled, targets, interest, dense) ─▶ MLP (Dice) ─▶ logit

Every schema ``sequence`` feature takes part; sequences listed together in one attention group
(default: all of them, which must then have equal lengths per row) are concatenated per behavior,
as the paper does with item and category.
"""

from __future__ import annotations

from typing import Any

import torch

from recsys.data.batch import Batch
from recsys.data.encode import POSITION_BITS
from recsys.data.vocab import DatasetInfo
from recsys.embedding.layer import Embedded
from recsys.layers.attention import TargetAttention
from recsys.layers.mlp import MLP
from recsys.train.module import CTRModule

ROW_IN_FILE = (1 << POSITION_BITS) - 1  # a position's low bits: the row within its file


class DIN(CTRModule):
    """Deep Interest Network over any dataset whose schema declares ``sequence`` features.

    Args:
        features: dataset info (linked from the data module by the CLI).
        attention_hidden_units: widths of the attention MLP.
        attention_activation: ``dice`` (paper), ``prelu``, ``relu``, ``sigmoid``.
        attention_softmax: normalise attention weights per row (the paper does not).
        attention_groups: lists of sequence features that attend together; default all in one.
        dnn_hidden_units, dnn_activation, dnn_dropout: the prediction MLP.
        **kwargs: ``embedding``, ``text``, ``mba_lambda`` (mini-batch aware L2), ``optimizer``.

    Example::

        model = DIN(datamodule.dataset_info, embedding={"dim": 16}, mba_lambda=0.01)
        logits = model(batch)       # [B]
    """

    def __init__(
        self,
        features: DatasetInfo | dict,
        attention_hidden_units: list[int] = [36],  # noqa: B006 (the paper's activation unit)
        attention_activation: str = "dice",
        attention_softmax: bool = False,
        attention_groups: list[list[str]] | None = None,
        dnn_hidden_units: list[int] = [200, 80],  # noqa: B006
        dnn_activation: str = "dice",
        dnn_dropout: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(features, **kwargs)
        self.target_of, self.groups = self.schema.sequence_groups(attention_groups, "DIN")
        self.targets = list(dict.fromkeys(self.target_of.values()))  # in schema order, unique
        self.embedding = self.embedding_layer(jagged=[*self.targets, *self.target_of])
        width = self.embedding.output_dims()
        self.pooled = self.embedding.pooled_features
        self.attention = torch.nn.ModuleList(
            TargetAttention(
                sum(width[s] for s in group), attention_hidden_units, attention_activation, attention_softmax
            )
            for group in self.groups
        )
        inputs = sum(width[f] for f in self.pooled) + sum(width[t] for t in self.targets)
        inputs += sum(width[s] for s in self.target_of) + len(self.schema.numeric)
        self.dnn = MLP(inputs, dnn_hidden_units, 1, dnn_activation, dnn_dropout)

    @property
    def aligned_sequences(self) -> list[list[str]]:
        """Sequences read together behavior by behavior: each row's must have equal lengths."""
        return [group for group in self.groups if len(group) > 1]

    def forward(self, batch: Batch) -> torch.Tensor:
        for group in self.aligned_sequences:
            lengths = [batch.sequences[s].lengths() for s in group]
            bad = torch.nonzero(torch.stack([ln != lengths[0] for ln in lengths[1:]]).any(0)).flatten()
            if len(bad):
                row = int(bad[0])
                position = None if batch.positions is None else int(batch.positions[row])
                where = (
                    ""
                    if position is None
                    else f" (file #{position >> POSITION_BITS} of the split, row {position & ROW_IN_FILE})"
                )
                raise ValueError(
                    f"sequences {group} attend together but differ in length in {len(bad)} row(s) of this "
                    f"batch, first batch row {row}{where}: {[int(ln[row]) for ln in lengths]}; fix the data "
                    f"(`recsys data check` lists every such row by file) or set attention_groups"
                )
        return super().forward(batch)

    def head(self, embedded: Embedded, dense: torch.Tensor) -> torch.Tensor:
        targets = {t: embedded.jagged[t].values() for t in self.targets}  # [B, W] each: one id per row
        parts = ([embedded.cat(self.pooled)] if self.pooled else []) + list(targets.values())
        for attention, group in zip(self.attention, self.groups, strict=True):
            lengths = embedded.jagged[group[0]].lengths()
            query = torch.cat([targets[self.target_of[s]] for s in group], dim=1)  # [B, W·|group|]
            keys = torch.cat([embedded.jagged[s].values() for s in group], dim=1)  # [N, W·|group|]
            parts.append(attention(query, keys, lengths))
        parts.append(dense)
        return self.dnn(torch.cat(parts, dim=1)).squeeze(-1)
