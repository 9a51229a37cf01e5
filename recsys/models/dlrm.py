"""DLRM (Naumov et al. 2019): dot-product feature interactions over embeddings and a dense projection.

::

    numeric features ──▶ bottom MLP ──▶ x [B, D] ─────────────────┐
    id features ──▶ EmbeddingBagCollection ──▶ e_1..e_F [B, D] ────┼─▶ all pairwise dots <v_i, v_j>, i < j
                                                                   │        [B, (F+1)F/2]
                                                    x ─────────────┴─▶ concat ─▶ top MLP ─▶ logit

Every table has the same width ``D`` (dot products need it); sequences are pooled in their
target's table like any multi-hot feature. The interaction is one batched matrix product.
"""

from __future__ import annotations

import torch
from lightning.pytorch.cli import OptimizerCallable

from recsys.data.batch import Batch
from recsys.data.vocab import DatasetInfo
from recsys.embedding.tables import IdGuard, concat_pooled, feature_order, pooled_tables
from recsys.layers.mlp import MLP
from recsys.train.module import CTRModule, default_optimizer


def dot_interaction(vectors: torch.Tensor) -> torch.Tensor:
    """``[B, F, D]`` → ``[B, F(F−1)/2]``: ``<v_i, v_j>`` for every pair ``i < j`` (row-major)."""
    num = vectors.shape[1]
    gram = torch.bmm(vectors, vectors.transpose(1, 2))  # [B, F, F]
    i, j = torch.triu_indices(num, num, offset=1, device=vectors.device)
    return gram[:, i, j]


class DLRM(CTRModule):
    """DLRM with a dot interaction.

    Args:
        features: dataset info (linked from the data module by the CLI).
        embedding_dim: width ``D`` of every table and of the bottom MLP's output.
        bottom_hidden_units: hidden widths of the bottom MLP (numeric features → ``D``).
        top_hidden_units: hidden widths of the top MLP (``D`` + interactions → logit).
        pooling: ``sum`` or ``mean`` for multi-hot features and sequences.
        optimizer: optimizer factory over all parameters.

    Example::

        model = DLRM(datamodule.dataset_info, embedding_dim=16)
        logits = model(batch)        # [B]
    """

    def __init__(
        self,
        features: DatasetInfo | dict,
        embedding_dim: int = 16,
        bottom_hidden_units: list[int] = [64],  # noqa: B006 (shown as the CLI default)
        top_hidden_units: list[int] = [256, 128],  # noqa: B006
        pooling: str = "sum",
        optimizer: OptimizerCallable = default_optimizer,
    ) -> None:
        super().__init__(features, optimizer)
        widths = {f.name: f.embedding_dim for f in self.schema.tables if f.embedding_dim not in (None, embedding_dim)}
        if widths:
            raise ValueError(f"{self.schema.source}: DLRM's dot interaction needs every table {embedding_dim} wide; "
                             f"the schema sets {widths}")
        self.tables = pooled_tables(self.info, embedding_dim, pooling)
        self.guard = IdGuard.for_tables(self.tables)
        self.pooled_order = feature_order(self.tables)
        self.dim = embedding_dim
        num_dense = len(self.schema.numeric)
        self.bottom = MLP(num_dense, bottom_hidden_units, embedding_dim, "relu") if num_dense else None
        vectors = len(self.pooled_order) + (1 if self.bottom is not None else 0)
        top_in = vectors * (vectors - 1) // 2 + (embedding_dim if self.bottom is not None else 0)
        self.top = MLP(top_in, top_hidden_units, 1, "relu")

    def forward(self, batch: Batch) -> torch.Tensor:
        ids = batch.all_ids()
        pooled = concat_pooled(self.tables(self.guard(ids)), self.pooled_order)  # [B, F·D]
        vectors = pooled.view(pooled.shape[0], -1, self.dim)
        parts = []
        if self.bottom is not None:
            x = self.bottom(batch.dense)
            vectors = torch.cat([x.unsqueeze(1), vectors], dim=1)
            parts.append(x)
        parts.append(dot_interaction(vectors))
        return self.top(torch.cat(parts, dim=1)).squeeze(-1)
