"""Embedding&MLP, the DIN paper's BaseModel.

::

    categorical / multi-hot ids ──▶ EmbeddingBagCollection ──▶ pooled [B, D_f] per feature ─┐
    behavior sequences ──(same table as their target, pooled)──▶ [B, D_target] per sequence ─┼─▶ concat ─▶ MLP ─▶ logit
    numeric features (standardized) ─────────────────────────────────────────▶ [B, n_dense] ─┘

The feature set comes from the dataset's ``schema.yaml``; nothing here names a column.
"""

from __future__ import annotations

import torch
from lightning.pytorch.cli import OptimizerCallable
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.data.batch import Batch
from recsys.data.vocab import DatasetInfo
from recsys.embedding.tables import IdGuard, concat_pooled, feature_order, pooled_tables
from recsys.embedding.unified import UnifiedEmbeddingBag, UnifiedSpec
from recsys.layers.mlp import MLP
from recsys.train.module import CTRModule, default_optimizer


class EmbeddingMLP(CTRModule):
    """Pooled id embeddings + sum/mean-pooled behavior sequences + numeric features → MLP.

    Args:
        features: dataset info (linked from the data module by the CLI).
        embedding_dim: default dimension of every table (a schema ``embedding_dim`` overrides it).
        pooling: how multi-hot lists and sequences are pooled, ``"sum"`` (the paper) or ``"mean"``.
        dnn_hidden_units: widths of the MLP's hidden layers.
        dnn_activation: ``relu``, ``prelu``, ``gelu``, ...
        dnn_dropout: dropout after each hidden layer.
        batch_norm: batch normalization in the MLP.
        unified: shared tables with per-feature probes (Unified Embedding) instead of one table
            per feature; see ``recsys.embedding.unified.UnifiedSpec``.
        optimizer: optimizer factory over all parameters.

    Example::

        model = EmbeddingMLP(datamodule.dataset_info, embedding_dim=16)
        logits = model(batch)        # [B]
    """

    def __init__(
        self,
        features: DatasetInfo | dict,
        embedding_dim: int = 16,
        pooling: str = "mean",
        dnn_hidden_units: list[int] = [200, 80],  # noqa: B006 (shown as the CLI default)
        dnn_activation: str = "relu",
        dnn_dropout: float = 0.0,
        batch_norm: bool = False,
        unified: UnifiedSpec | None = None,
        optimizer: OptimizerCallable = default_optimizer,
    ) -> None:
        super().__init__(features, optimizer)
        if unified is None:  # one table per feature (sequences share their target's)
            self.tables = pooled_tables(self.info, embedding_dim, pooling)
            self.guard = IdGuard.for_tables(self.tables)
            self.pooled_order = feature_order(self.tables)
            width = sum(c.embedding_dim * len(c.feature_names) for c in self.tables.embedding_bag_configs())
        else:  # feature multiplexing: every feature probes the shared table(s)
            owners = {f.name: f.name for f in self.schema.sparse} | {s.name: s.target for s in self.schema.sequences}
            self.tables = UnifiedEmbeddingBag(owners, unified, pooling)
            self.guard = IdGuard({f: self.info.num_embeddings[o] for f, o in owners.items()})
            self.pooled_order = list(owners)
            width = sum(self.tables.output_dims().values())
        width += len(self.schema.numeric)
        self.dnn = MLP(width, dnn_hidden_units, 1, dnn_activation, dnn_dropout, batch_norm)

    def forward(self, batch: Batch) -> torch.Tensor:
        ids = batch.sparse
        if batch.sequences.keys():
            ids = KeyedJaggedTensor.concat([batch.sparse, batch.sequences])
        pooled = concat_pooled(self.tables(self.guard(ids)), self.pooled_order)  # [B, Σ D_f]
        return self.dnn(torch.cat([pooled, batch.dense], dim=1)).squeeze(-1)
