"""DCN-V2 (Wang et al., 2021): explicit cross layers beside (or before) a DNN.

::

    id features ──▶ EmbeddingLayer (any kind) ──▶ pooled [B, Σ W_f] ─┐
    numeric features ────────────────────────────────────────────────┴─▶ x_0 [B, N]
        parallel:  x_0 ─▶ cross layers x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l ─┐
                   x_0 ─▶ DNN ───────────────────────────────────────────────┴─▶ concat ─▶ linear ─▶ logit
        stacked:   x_0 ─▶ cross layers ─▶ DNN ─▶ linear ─▶ logit

The cross layers are torchrec's ``CrossNet`` (full rank) or ``LowRankMixtureCrossNet`` (``cross_low_rank``
set: a mixture of ``cross_experts`` low-rank experts, the paper's DCN-Mix).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from recsys.data.vocab import DatasetInfo
from recsys.embedding.layer import Embedded
from recsys.layers.interaction import cross_network
from recsys.layers.mlp import MLP
from recsys.train.module import CTRModule

STRUCTURES = ("parallel", "stacked")


class DCNv2(CTRModule):
    """DCN-V2.

    Args:
        features: dataset info (linked from the data module by the CLI).
        cross_layers: number of cross layers.
        cross_low_rank: rank of each low-rank expert (None: full-rank ``W_l``).
        cross_experts: low-rank experts per layer (with ``cross_low_rank``).
        structure: ``parallel`` (cross ∥ DNN, concatenated) or ``stacked`` (cross, then DNN).
        dnn_hidden_units, dnn_activation, dnn_dropout, batch_norm: the DNN.
        **kwargs: ``embedding``, ``text``, ``mba_lambda``, ``optimizer``.

    Example::

        model = DCNv2(datamodule.dataset_info, cross_layers=3, structure="parallel")
        logits = model(batch)        # [B]
    """

    def __init__(
        self,
        features: DatasetInfo | dict,
        cross_layers: int = 3,
        cross_low_rank: int | None = None,
        cross_experts: int = 1,
        structure: str = "parallel",
        dnn_hidden_units: list[int] = [200, 80],  # noqa: B006 (shown as the CLI default)
        dnn_activation: str = "relu",
        dnn_dropout: float = 0.0,
        batch_norm: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(features, **kwargs)
        if structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
        self.embedding = self.embedding_layer()
        self.pooled = self.embedding.pooled_features
        widths = self.embedding.output_dims()
        width = sum(widths[f] for f in self.pooled) + len(self.schema.numeric)
        self.structure = structure
        self.cross = cross_network(width, cross_layers, cross_low_rank, cross_experts)
        self.dnn = MLP(width, dnn_hidden_units, None, dnn_activation, dnn_dropout, batch_norm)
        deep = dnn_hidden_units[-1] if dnn_hidden_units else width
        self.out = nn.Linear(deep + (width if structure == "parallel" else 0), 1)

    def head(self, embedded: Embedded, dense: torch.Tensor) -> torch.Tensor:
        x0 = torch.cat([embedded.cat(self.pooled), dense], dim=1)
        if self.structure == "stacked":
            return self.out(self.dnn(self.cross(x0))).squeeze(-1)
        return self.out(torch.cat([self.cross(x0), self.dnn(x0)], dim=1)).squeeze(-1)
