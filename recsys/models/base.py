"""Embedding&MLP, the DIN paper's BaseModel.

::

    id features, lists, behavior sequences ──▶ EmbeddingLayer (any table kind) ──▶ pooled [B, W_f] each ─┐
    text columns (if the text block is set) ──▶ item text joined to its item, row text pooled ──────────┼▶ concat
    numeric features (standardized) ─────────────────────────────────────────────────────▶ [B, n_dense] ─┘    │
                                                                                                 MLP ▶ logit ◀┘

The feature set comes from the dataset's ``schema.yaml``; nothing here names a column.
"""

from __future__ import annotations

from typing import Any

import torch

from recsys.data.vocab import DatasetInfo
from recsys.embedding.layer import Embedded
from recsys.layers.mlp import MLP
from recsys.train.module import CTRModule


class EmbeddingMLP(CTRModule):
    """Pooled embeddings of every feature + numeric features → MLP.

    Args:
        features: dataset info (linked from the data module by the CLI).
        dnn_hidden_units: widths of the MLP's hidden layers.
        dnn_activation: ``relu``, ``prelu``, ``gelu``, ...
        dnn_dropout: dropout after each hidden layer.
        batch_norm: batch normalization in the MLP.
        **kwargs: ``embedding``, ``text``, ``mba_lambda``, ``optimizer`` (``recsys.train.module.CTRModule``).

    Example::

        model = EmbeddingMLP(datamodule.dataset_info, embedding={"dim": 16})
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
        width = sum(self.embedding.output_dims()[f] for f in self.pooled) + len(self.schema.numeric)
        self.dnn = MLP(width, dnn_hidden_units, 1, dnn_activation, dnn_dropout, batch_norm)

    def head(self, embedded: Embedded, dense: torch.Tensor) -> torch.Tensor:
        return self.dnn(torch.cat([embedded.cat(self.pooled), dense], dim=1)).squeeze(-1)
