"""FinalMLP (Mao et al., 2023): two MLP streams with feature gating, fused bilinearly.

::

    id features ──▶ EmbeddingLayer (any kind) ──▶ pooled [B, Σ W_f] ─┐
    numeric features ────────────────────────────────────────────────┴─▶ x [B, N]
      stream 1: x ⊙ 2σ(MLP(context₁)) ─▶ MLP₁ ─▶ o₁ ─┐
      stream 2: x ⊙ 2σ(MLP(context₂)) ─▶ MLP₂ ─▶ o₂ ─┴─▶ Σ_h (w₁ᵀo₁ₕ + w₂ᵀo₂ₕ + o₁ₕᵀ W_h o₂ₕ) ─▶ logit

A stream's gating context is the concatenation of the features it names (``gate1_context``), or a
learned vector when it names none: each stream learns which inputs to weight.
"""

from __future__ import annotations

from typing import Any

import torch

from recsys.data.vocab import DatasetInfo
from recsys.embedding.layer import Embedded
from recsys.layers.interaction import BilinearFusion, FeatureGating
from recsys.layers.mlp import MLP
from recsys.train.module import CTRModule


class FinalMLP(CTRModule):
    """FinalMLP.

    Args:
        features: dataset info (linked from the data module by the CLI).
        mlp1_hidden_units, mlp1_activation, mlp1_dropout: stream 1.
        mlp2_hidden_units, mlp2_activation, mlp2_dropout: stream 2.
        gate_hidden_units: the gating MLPs' hidden widths.
        gate1_context, gate2_context: features whose embeddings condition each stream's gate (none: a
            learned vector).
        fusion_heads: heads of the bilinear fusion (must divide both streams' output widths).
        **kwargs: ``embedding``, ``text``, ``mba_lambda``, ``optimizer``.

    Example::

        model = FinalMLP(datamodule.dataset_info, gate1_context=["user_id"], gate2_context=["item_id"])
        logits = model(batch)        # [B]
    """

    def __init__(
        self,
        features: DatasetInfo | dict,
        mlp1_hidden_units: list[int] = [400, 400],  # noqa: B006 (shown as the CLI default)
        mlp1_activation: str = "relu",
        mlp1_dropout: float = 0.0,
        mlp2_hidden_units: list[int] = [800],  # noqa: B006
        mlp2_activation: str = "relu",
        mlp2_dropout: float = 0.0,
        gate_hidden_units: list[int] = [200],  # noqa: B006
        gate1_context: list[str] = [],  # noqa: B006
        gate2_context: list[str] = [],  # noqa: B006
        fusion_heads: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(features, **kwargs)
        self.embedding = self.embedding_layer()
        self.pooled = self.embedding.pooled_features
        widths = self.embedding.output_dims()
        unknown = [f for f in [*gate1_context, *gate2_context] if f not in widths]
        if unknown:
            raise ValueError(
                f"gate context {unknown[0]!r} is not a pooled feature of {self.schema.source} ({self.pooled})"
            )
        self.contexts = [list(gate1_context), list(gate2_context)]
        width = sum(widths[f] for f in self.pooled) + len(self.schema.numeric)
        self.gates = torch.nn.ModuleList(
            FeatureGating(width, sum(widths[f] for f in c), gate_hidden_units) for c in self.contexts
        )
        self.mlp1 = MLP(width, mlp1_hidden_units, None, mlp1_activation, mlp1_dropout)
        self.mlp2 = MLP(width, mlp2_hidden_units, None, mlp2_activation, mlp2_dropout)
        self.fusion = BilinearFusion(self.mlp1.out_features, self.mlp2.out_features, fusion_heads)

    def head(self, embedded: Embedded, dense: torch.Tensor) -> torch.Tensor:
        x = torch.cat([embedded.cat(self.pooled), dense], dim=1)
        gated = [
            gate(x, embedded.cat(context) if context else None)
            for gate, context in zip(self.gates, self.contexts, strict=True)
        ]
        return self.fusion(self.mlp1(gated[0]), self.mlp2(gated[1]))
