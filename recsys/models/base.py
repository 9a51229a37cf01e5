"""Embedding&MLP, the DIN paper's BaseModel.

::

    categorical / multi-hot ids ──▶ EmbeddingBagCollection ──▶ pooled [B, D_f] per feature ─┐
    behavior sequences ──(same table as their target, pooled)──▶ [B, D_target] per sequence ─┼─▶ concat ─▶ MLP ─▶ logit
    numeric features (standardized) ─────────────────────────────────────────▶ [B, n_dense] ─┘

The feature set comes from the dataset's ``schema.yaml``; nothing here names a column.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.cli import OptimizerCallable
from torchrec import EmbeddingCollection

from recsys.data.batch import Batch
from recsys.data.vocab import DatasetInfo
from recsys.embedding.optembed import CompactEmbeddingBag, OptEmbedBag, OptEmbedSpec, load_artifact
from recsys.embedding.tables import IdGuard, concat_pooled, feature_order, pooled_tables
from recsys.embedding.unified import UnifiedEmbeddingBag, UnifiedSpec
from recsys.layers.mlp import MLP
from recsys.train.module import CTRModule, default_optimizer, load_model


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
        optembed: OptEmbedSpec | None = None,
        optimizer: OptimizerCallable = default_optimizer,
    ) -> None:
        super().__init__(features, optimizer)
        owners = {f.name: f.name for f in self.schema.sparse} | {s.name: s.target for s in self.schema.sequences}
        # specs come back as plain dicts from some checkpoints (the torchrec strategy's)
        unified = UnifiedSpec(**unified) if isinstance(unified, dict) else unified
        optembed = OptEmbedSpec(**optembed) if isinstance(optembed, dict) else optembed
        self.optembed = optembed
        if unified is not None and optembed is not None:
            raise ValueError("unified and optembed tables are exclusive; pick one")
        if optembed is not None:
            self.tables = self._optembed_tables(owners, embedding_dim, pooling, optembed)
            self.guard = IdGuard({f: self.info.num_embeddings[o] for f, o in owners.items()})
            self.pooled_order = list(owners)
            width = sum(self.tables.output_dims().values())
        elif unified is None:  # one table per feature (sequences share their target's)
            self.tables = pooled_tables(self.info, embedding_dim, pooling)
            self.guard = IdGuard.for_tables(self.tables)
            self.pooled_order = feature_order(self.tables)
            width = sum(c.embedding_dim * len(c.feature_names) for c in self.tables.embedding_bag_configs())
        else:  # feature multiplexing: every feature probes the shared table(s)
            self.tables = UnifiedEmbeddingBag(owners, unified, pooling)
            self.guard = IdGuard({f: self.info.num_embeddings[o] for f, o in owners.items()})
            self.pooled_order = list(owners)
            width = sum(self.tables.output_dims().values())
        width += len(self.schema.numeric)
        self.dnn = MLP(width, dnn_hidden_units, 1, dnn_activation, dnn_dropout, batch_norm)
        if getattr(self, "_warm_start", None):  # OptEmbed retrain from the supernet's weights
            self.load_state_dict(load_model(self._warm_start).to_compact(load_artifact(optembed.artifact)).state_dict())

    def _optembed_tables(self, owners: dict[str, str], dim: int, pooling: str, spec: OptEmbedSpec) -> OptEmbedBag | CompactEmbeddingBag:
        rows = {o: self.info.num_embeddings[o] for o in owners.values()}
        if spec.stage == "supernet":
            return OptEmbedBag(owners, rows, dim, pooling, spec)
        kept = None
        if not spec.dims:  # fresh retrain: read the search result (a checkpoint carries dims and remaps)
            artifact = load_artifact(spec.artifact)
            kept = artifact["kept"]
            spec.dims = {o: int(d) for o, d in artifact["dims"].items()}
            spec.kept_rows = {o: int(m.sum()) for o, m in kept.items()}
            self.hparams["optembed"] = spec  # a compact checkpoint then loads without the artifact
        tables = CompactEmbeddingBag(owners, rows, spec.dims, spec.kept_rows, pooling, kept)
        self._warm_start = artifact["supernet"] if kept is not None and spec.warm_start else None
        return tables

    def pooled(self, batch: Batch) -> torch.Tensor:
        """``[B, Σ D_f]``: every id feature's pooled embedding, in ``pooled_order``."""
        ids = batch.all_ids()
        return concat_pooled(self.tables(self.guard(ids)), self.pooled_order)

    def head(self, pooled: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """Logits ``[B]`` from pooled embeddings ``[B, Σ D_f]`` and numeric features."""
        return self.dnn(torch.cat([pooled, dense], dim=1)).squeeze(-1)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.head(self.pooled(batch), batch.dense)

    def dense_program(self) -> torch.export.ExportedProgram:
        """The network after the lookups, ``(pooled [B, Σ D_f], dense [B, n]) → logits [B]``, as a
        ``torch.export`` program with a dynamic batch (export writes it for non-Python servers)."""
        width = self.dnn.layers[0].in_features - len(self.schema.numeric)
        example = (torch.zeros(2, width), torch.zeros(2, len(self.schema.numeric)))
        batch = torch.export.Dim("batch", min=1)
        head = _Head(self.dnn).eval()
        return torch.export.export(head, example, dynamic_shapes=({0: batch}, {0: batch}))


    # -- OptEmbed --------------------------------------------------------------------------
    def regularization(self, batch: Batch) -> torch.Tensor | float:
        return self.tables.regularization() if isinstance(self.tables, OptEmbedBag) else 0.0

    def optimizer_groups(self) -> list[dict]:
        groups = super().optimizer_groups()
        if not isinstance(self.tables, OptEmbedBag):
            return groups
        threshold = self.tables.threshold
        rest = [p for p in groups[0]["params"] if p is not threshold]
        return [{"params": rest}, {"params": [threshold], "lr": self.optembed.threshold_lr, "weight_decay": 0.0}]

    def on_train_epoch_end(self) -> None:
        # thresholds vs whole tables; a sharded table's rows live on several ranks, so not logged there
        if isinstance(self.tables, OptEmbedBag) and isinstance(self.tables.tables, EmbeddingCollection):
            masks = self.tables.row_masks()
            kept = sum(int(m.sum()) for m in masks.values())
            self.log("optembed/rows_kept", kept / sum(m.numel() for m in masks.values()))
            self.log("optembed/threshold_mean", self.tables.threshold.mean())

    def to_compact(self, artifact: str | Path | dict) -> EmbeddingMLP:
        """The compact model of this supernet under a search result, with the supernet's weights:
        kept rows (first ``dims_t`` columns) and the MLP's matching input columns. It predicts
        exactly what this supernet predicts with ``eval_dims = dims``."""
        if not isinstance(self.tables, OptEmbedBag):
            raise TypeError("to_compact needs an OptEmbed supernet (optembed.stage=supernet)")
        artifact = artifact if isinstance(artifact, dict) else load_artifact(artifact)
        dims, kept = artifact["dims"], artifact["kept"]
        hparams = {k: v for k, v in self.hparams.items() if not k.startswith("_")}
        spec = OptEmbedSpec(stage="compact", dims=dict(dims), kept_rows={o: int(m.sum()) for o, m in kept.items()})
        compact = type(self)(**(hparams | {"optembed": spec}))
        compact.tables = CompactEmbeddingBag(self.tables.owners, self.tables.rows, spec.dims, spec.kept_rows,
                                             self.tables.pooling, kept)
        columns = []
        offset = 0
        for feature in self.pooled_order:
            columns += range(offset, offset + int(dims[self.tables.owners[feature]]))
            offset += self.tables.dim
        columns += range(offset, offset + len(self.schema.numeric))
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("tables.")}
        first = next(k for k in state if k.endswith("weight") and k.startswith("dnn.") and state[k].dim() == 2)
        state[first] = state[first][:, columns]
        with torch.no_grad():
            for owner, mask in kept.items():
                compact.tables.weight(owner)[1:] = self.tables.weight(owner)[mask][:, : int(dims[owner])]
        compact.load_state_dict(state | {f"tables.{k}": v for k, v in compact.tables.state_dict().items()})
        return compact.eval()


class _Head(torch.nn.Module):
    def __init__(self, dnn: MLP) -> None:
        super().__init__()
        self.dnn = dnn

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return self.dnn(torch.cat([pooled, dense], dim=1)).squeeze(-1)
