"""DeepFM (Guo et al., 2017): a factorization machine and a DNN over the same embeddings.

::

    id features ──▶ EmbeddingLayer (any kind) ──▶ e_1..e_F ─┬─(to width D)─▶ FM: Σ_{i<j} ⟨e_i, e_j⟩ ──────┐
    numeric features ───────────────────────────────────────┼──▶ concat x ─▶ linear (first order) ─▶ (+) ─▶ logit
                                                            └──▶ concat x ─▶ DNN ─────────────────────┘

The FM's second-order term needs one width ``D`` (``embedding.dim``): a field another kind or a text
column makes wider is projected to ``D``. The first-order term is a linear map of ``x`` (a row's own
scalar weight would be a second table of width 1, and FBGEMM's kernels need widths in multiples of 4).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from recsys.data.vocab import DatasetInfo
from recsys.embedding.layer import Embedded
from recsys.layers.interaction import FieldProjection, fm_interaction
from recsys.layers.mlp import MLP
from recsys.train.module import CTRModule


class DeepFM(CTRModule):
    """DeepFM.

    Args:
        features: dataset info (linked from the data module by the CLI).
        dnn_hidden_units, dnn_activation, dnn_dropout, batch_norm: the deep part.
        **kwargs: ``embedding`` (its ``dim`` is the FM's width), ``text``, ``mba_lambda``, ``optimizer``.

    Example::

        model = DeepFM(datamodule.dataset_info, embedding={"dim": 16})
        logits = model(batch)        # [B]
    """

    def __init__(
        self,
        features: DatasetInfo | dict,
        dnn_hidden_units: list[int] = [200, 80],  # noqa: B006 (shown as the CLI default)
        dnn_activation: str = "relu",
        dnn_dropout: float = 0.0,
        batch_norm: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(features, **kwargs)
        self.embedding = self.embedding_layer()
        self.pooled = self.embedding.pooled_features
        widths = self.embedding.output_dims()
        self.fields = FieldProjection({f: widths[f] for f in self.pooled}, self.embedding.spec.dim)
        width = sum(widths[f] for f in self.pooled) + len(self.schema.numeric)
        self.first_order = nn.Linear(width, 1)
        self.dnn = MLP(width, dnn_hidden_units, 1, dnn_activation, dnn_dropout, batch_norm)

    def head(self, embedded: Embedded, dense: torch.Tensor) -> torch.Tensor:
        x = torch.cat([embedded.cat(self.pooled), dense], dim=1)
        second_order = fm_interaction(self.fields(embedded.pooled))
        return self.first_order(x).squeeze(-1) + second_order + self.dnn(x).squeeze(-1)
