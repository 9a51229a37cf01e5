"""DLRM (Naumov et al. 2019): dot-product feature interactions over embeddings and a dense projection.

::

    numeric features ──▶ bottom MLP ──▶ x [B, D] ──────────────────────────┐
    id features ──▶ EmbeddingLayer (any kind) ──▶ e_1..e_F ─(to width D)─▶ ┼─▶ all pairwise dots <v_i, v_j>, i < j
                                                                           │        [B, (F+1)F/2]
                                                         x ────────────────┴─▶ concat ─▶ top MLP ─▶ logit

The dot product needs one width ``D`` (``embedding.dim``): a field the table kind or a text column
makes wider or narrower is projected to ``D`` by its own linear map. Sequences are pooled in their
target's table like any multi-hot feature. The interaction is one batched matrix product.
"""

from __future__ import annotations

from typing import Any

import torch

from recsys.data.vocab import DatasetInfo
from recsys.embedding.layer import Embedded
from recsys.layers.interaction import FieldProjection, dot_interaction
from recsys.layers.mlp import MLP
from recsys.train.module import CTRModule


class DLRM(CTRModule):
    """DLRM with a dot interaction.

    Args:
        features: dataset info (linked from the data module by the CLI).
        bottom_hidden_units: hidden widths of the bottom MLP (numeric features → ``D``).
        top_hidden_units: hidden widths of the top MLP (``D`` + interactions → logit).
        **kwargs: ``embedding`` (its ``dim`` is ``D``), ``text``, ``mba_lambda``, ``optimizer``.

    Example::

        model = DLRM(datamodule.dataset_info, embedding={"dim": 16, "pooling": "sum"})
        logits = model(batch)        # [B]
    """

    def __init__(
        self,
        features: DatasetInfo | dict,
        bottom_hidden_units: list[int] = [64],  # noqa: B006 (shown as the CLI default)
        top_hidden_units: list[int] = [256, 128],  # noqa: B006
        **kwargs: Any,
    ) -> None:
        super().__init__(features, **kwargs)
        self.embedding = self.embedding_layer()
        dim = self.embedding.spec.dim
        widths = self.embedding.output_dims()
        self.fields = FieldProjection({f: widths[f] for f in self.embedding.pooled_features}, dim)
        num_dense = len(self.schema.numeric)
        self.bottom = MLP(num_dense, bottom_hidden_units, dim, "relu") if num_dense else None
        vectors = len(self.fields.fields) + (1 if self.bottom is not None else 0)
        top_in = vectors * (vectors - 1) // 2 + (dim if self.bottom is not None else 0)
        self.top = MLP(top_in, top_hidden_units, 1, "relu")

    def head(self, embedded: Embedded, dense: torch.Tensor) -> torch.Tensor:
        vectors = self.fields(embedded.pooled)  # [B, F, D]
        parts = []
        if self.bottom is not None:
            x = self.bottom(dense)
            vectors = torch.cat([x.unsqueeze(1), vectors], dim=1)
            parts.append(x)
        parts.append(dot_interaction(vectors))
        return self.top(torch.cat(parts, dim=1)).squeeze(-1)
