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

With item text, ``item_id_dropout`` trains the item tower for items it has no trained row for
(DropoutNet, Volkovs et al. 2017): that share of the clicked rows reads the out-of-vocabulary row
instead of the item's own ID row (its text stays), so a cold item — OOV row ⊕ its text — gets a
vector from its content alone (``item_vectors(rows, text=…)``): a hybrid learned end to end.
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
    item_id_dropout: share of clicked rows whose item ID row is replaced by the out-of-vocabulary row
        in training (needs item text combined by ``concat``; 0: off).
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
        item_id_dropout: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(features, **kwargs)
        if not 0.0 <= item_id_dropout < 1.0:
            raise ValueError(f"model.init_args.item_id_dropout: {item_id_dropout} is not in [0, 1)")
        if self.schema[history].target != item:
            raise ValueError(f"{self.schema.source}: {history!r} must be a sequence of {item!r}")
        if self.schema[item].raw:
            raise ValueError(
                f"{self.schema.source}: {item!r} has `vocabulary: none`, and TwoTower retrieves over the item "
                f"vocabulary (its catalogue and the in-batch softmax's frequency correction); give it a vocabulary"
            )
        self.user, self.item, self.history, self.temperature = user, item, history, temperature
        self.item_id_dropout = item_id_dropout
        self.embedding = self.embedding_layer(features=[user, item, history])
        widths = self.embedding.output_dims()
        self.text_width = self.embedding.text_dims.get(item, 0)  # the item's text part (last columns), if any
        if item_id_dropout and not (self.text_width and self.embedding.text_spec.combine == "concat"):
            raise ValueError(
                "model.init_args.item_id_dropout: an item whose ID row is dropped keeps only its text, and "
                f"{item!r} has no item text combined by concat (add --config configs/text/hybrid_tower.yaml)"
            )
        kind = self.embedding.plans[item].kind
        if item_id_dropout and kind != "plain":
            raise ValueError(
                f"model.init_args.item_id_dropout: dropped rows read the out-of-vocabulary row, which is a row of "
                f"its own only in a plain table; {item!r}'s table is {kind!r} (its OOV row shares a row with items)"
            )
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

    def item_vectors(self, rows: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        """``[n]`` item table rows → ``[n, E]`` L2-normalized item vectors; ``text`` (``[n, text_width]``,
        e.g. ``ItemText.pool_states`` + ``proj`` of texts the table has no row for) replaces the text part
        that the rows read."""
        vectors = self.embedding.embed_ids(self.item, rows)
        if text is not None:
            vectors = torch.cat([vectors[:, : vectors.shape[1] - self.text_width], text], dim=1)
        return self._items(vectors)

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
        return self._in_batch_loss(self.embedding(batch), batch, clicked)

    # -- validation: the same loss on the val split's clicks ---------------------------------------
    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """CTR metrics as every model, and the in-batch softmax over this share's real clicked rows,
        summed for ``val/in_batch_loss`` (what a retrieval checkpoint is chosen by: ``val/auc`` ranks a
        user's clicked rows above their other rated rows, not items against the catalogue, and peaked
        at epochs 0–2 on ml100k-cold). Under several ranks each scores a share of every batch, so the
        negatives are a share's clicks: the value is comparable between epochs of one run."""
        embedded = self.embedding(batch)  # once, for both (a sharded table's lookup is collective: every share)
        self._shared_step(batch, "val", logits=self.head(embedded, batch.dense))
        real = torch.arange(len(batch), device=batch.labels.device) < len(batch) - batch.padded
        clicked = (batch.labels > 0.5) & real
        count = int(clicked.sum())
        if count >= 2:
            self._val_in_batch[0] += float(self._in_batch_loss(embedded, batch, clicked)) * count
            self._val_in_batch[1] += count

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._val_in_batch = [0.0, 0]  # loss × clicks, clicks

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        totals = torch.tensor(self._val_in_batch, dtype=torch.float64, device=self.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)  # once per epoch, on every rank
        if totals[1] > 0:
            self.log("val/in_batch_loss", float(totals[0] / totals[1]))

    def _in_batch_loss(self, embedded: Embedded, batch: Batch, clicked: torch.Tensor) -> torch.Tensor:
        """The in-batch softmax over the ``clicked`` rows (at least 2) of an embedded batch."""
        users = self._users(embedded)[clicked]
        rows = batch.sparse[self.item].values()[clicked]
        items = self._items(self._drop_ids(embedded.pooled[self.item][clicked]))
        logits = users @ items.T / self.temperature - self.log_q[rows]  # [P, P]
        same = rows.unsqueeze(0) == rows.unsqueeze(1)  # another positive of the same item is no negative
        logits = logits.masked_fill(same & ~torch.eye(len(rows), dtype=torch.bool, device=rows.device), float("-inf"))
        return F.cross_entropy(logits, torch.arange(len(rows), device=rows.device))

    def _drop_ids(self, items: torch.Tensor) -> torch.Tensor:
        """``[P, W_id + W_text]`` item inputs with the ID part of a random ``item_id_dropout`` share of the
        rows replaced by the out-of-vocabulary row's (in training only)."""
        if not (self.training and self.item_id_dropout):
            return items
        id_width = items.shape[1] - self.text_width
        oov = self.embedding.embed_ids(self.item, torch.zeros(1, dtype=torch.long, device=items.device))
        drop = torch.rand(len(items), 1, device=items.device) < self.item_id_dropout
        return torch.cat([torch.where(drop, oov[:, :id_width], items[:, :id_width]), items[:, id_width:]], dim=1)
