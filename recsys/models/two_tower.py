"""Two-tower retrieval model trained with in-batch sampled softmax and log-q correction.

::

    user tower: user id ⊕ pooled behavior sequence (⊕ row-level text) ──▶ MLP ──▶ u [B, E]
    item tower: item id (⊕ item text) ─────────────────────────────────────▶ MLP ──▶ v [B, E]
    (all from the EmbeddingLayer: any table kind)

The clicked rows of a batch (label 1) are its positives; every other clicked item of the batch is a
negative. Logits ``u_i · v_j / τ − log q_j`` with ``q_j`` the item's share of train clicks (Yi
et al. 2019: in-batch negatives over-sample popular items; subtracting ``log q`` corrects it).
``forward(batch)`` is the matched score ``u_i · v_i / τ`` (usable as a CTR score), and
``user_vectors`` / ``item_vectors`` feed the ANN index (``recsys.retrieval``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from recsys.data.batch import Batch
from recsys.data.vocab import DatasetInfo
from recsys.embedding.layer import Embedded
from recsys.layers.mlp import MLP
from recsys.train.module import CTRModule


class TwoTower(CTRModule):
    """Args:
    features: dataset info (linked from the data module by the CLI).
    user: the user id feature; item: the item id feature; history: the item behavior sequence.
    tower_hidden_units: hidden widths of both towers; ``output_dim`` their output.
    temperature: softmax temperature ``τ``.
    **kwargs: ``embedding``, ``text``, ``mba_lambda``, ``optimizer``.
    """

    def __init__(
        self,
        features: DatasetInfo | dict,
        user: str = "user_id",
        item: str = "item_id",
        history: str = "hist_item_id",
        tower_hidden_units: list[int] = [64],  # noqa: B006
        output_dim: int = 32,
        temperature: float = 0.05,
        **kwargs: Any,
    ) -> None:
        super().__init__(features, **kwargs)
        if self.schema[history].target != item:
            raise ValueError(f"{self.schema.source}: {history!r} must be a sequence of {item!r}")
        if self.schema[item].raw:
            raise ValueError(
                f"{self.schema.source}: {item!r} has `vocabulary: none`, and TwoTower retrieves over the item "
                f"vocabulary (its catalogue and the in-batch softmax's frequency correction); give it a vocabulary"
            )
        self.user, self.item, self.history, self.temperature = user, item, history, temperature
        self.embedding = self.embedding_layer(features=[user, item, history])
        widths = self.embedding.output_dims()
        self.user_features = [f for f in self.embedding.pooled_features if f != item]
        self.user_tower = MLP(sum(widths[f] for f in self.user_features), tower_hidden_units, output_dim)
        self.item_tower = MLP(widths[item], tower_hidden_units, output_dim)
        counts = self.resources.train_counts(item) if self.resources is not None else None
        counts = torch.ones(self.info.num_embeddings[item]) if counts is None else torch.as_tensor(counts).float()
        self.register_buffer("log_q", torch.log((counts + 1) / (counts + 1).sum()))

    def training_only_state(self) -> tuple[str, ...]:
        return (*super().training_only_state(), "log_q")  # the in-batch softmax's correction

    # -- towers ----------------------------------------------------------------------------------
    def _users(self, embedded: Embedded) -> torch.Tensor:
        return F.normalize(self.user_tower(embedded.cat(self.user_features)), dim=1)

    def _items(self, vectors: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.item_tower(vectors), dim=1)

    def item_vectors(self, rows: torch.Tensor) -> torch.Tensor:
        """``[n]`` item table rows → ``[n, E]`` L2-normalized item vectors."""
        return self._items(self.embedding.embed_ids(self.item, rows))

    def user_vectors(self, batch: Batch) -> torch.Tensor:
        """``[B, E]`` L2-normalized user vectors from the user id and the behavior sequence."""
        return self._users(self.embedding(batch))

    def head(self, embedded: Embedded, dense: torch.Tensor) -> torch.Tensor:
        return (self._users(embedded) * self._items(embedded.pooled[self.item])).sum(1) / self.temperature

    # -- training: in-batch softmax over the clicked rows ------------------------------------------
    def training_loss(self, batch: Batch) -> torch.Tensor | None:
        clicked = batch.labels > 0.5
        if int(clicked.sum()) < 2:
            return None
        embedded = self.embedding(batch)
        users = self._users(embedded)[clicked]
        rows = batch.sparse[self.item].values()[clicked]
        items = self._items(embedded.pooled[self.item][clicked])
        logits = users @ items.T / self.temperature - self.log_q[rows]  # [P, P]
        same = rows.unsqueeze(0) == rows.unsqueeze(1)  # another positive of the same item is no negative
        logits = logits.masked_fill(same & ~torch.eye(len(rows), dtype=torch.bool, device=rows.device), float("-inf"))
        return F.cross_entropy(logits, torch.arange(len(rows), device=rows.device))
