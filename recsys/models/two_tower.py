"""Two-tower retrieval model trained with in-batch sampled softmax and log-q correction.

::

    user tower: user id ⊕ mean of the behavior sequence's item embeddings ──▶ MLP ──▶ u [B, E]
    item tower: item id embedding (⊕ item text vector) ──────────────────────▶ MLP ──▶ v [B, E]

The clicked rows of a batch (label 1) are its positives; every other clicked item of the batch is a
negative. Logits ``u_i · v_j / τ − log q_j`` with ``q_j`` the item's share of train clicks (Yi
et al. 2019: in-batch negatives over-sample popular items; subtracting ``log q`` corrects it).
``forward(batch)`` is the matched score ``u_i · v_i`` (usable as a CTR score), and
``user_vectors`` / ``item_vectors`` feed the ANN index (``recsys.retrieval``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torchrec import EmbeddingCollection, EmbeddingConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.data.batch import Batch
from recsys.data.vocab import DatasetInfo, Vocabulary
from recsys.embedding.optembed import pool_jagged
from recsys.embedding.tables import IdGuard, table_device
from recsys.layers.mlp import MLP
from recsys.text.features import ItemText, TextSpec
from recsys.train.module import CTRModule, default_optimizer


class TwoTower(CTRModule):
    """Args:
        features: dataset info (linked from the data module by the CLI).
        user: the user id feature; item: the item id feature; history: the item behavior sequence.
        embedding_dim: width of the id tables.
        tower_hidden_units: hidden widths of both towers; ``output_dim`` their output.
        temperature: softmax temperature ``τ``.
        text: item text vectors in the item tower (``recsys.text.features.TextSpec``, combine ``concat``).
        optimizer: optimizer factory over all parameters.
    """

    def __init__(
        self,
        features: DatasetInfo | dict,
        user: str = "user_id",
        item: str = "item_id",
        history: str = "hist_item_id",
        embedding_dim: int = 32,
        tower_hidden_units: list[int] = [64],  # noqa: B006
        output_dim: int = 32,
        temperature: float = 0.05,
        text: TextSpec | None = None,
        optimizer: OptimizerCallable = default_optimizer,
    ) -> None:
        super().__init__(features, optimizer)
        text = TextSpec(**text) if isinstance(text, dict) else text
        if self.schema[history].target != item:
            raise ValueError(f"{self.schema.source}: {history!r} must be a sequence of {item!r}")
        self.user, self.item, self.history, self.temperature = user, item, history, temperature
        self.tables = EmbeddingCollection(tables=[
            EmbeddingConfig(name=f"t_{user}", embedding_dim=embedding_dim, num_embeddings=self.info.num_embeddings[user],
                            feature_names=[user]),
            EmbeddingConfig(name=f"t_{item}", embedding_dim=embedding_dim, num_embeddings=self.info.num_embeddings[item],
                            feature_names=[item, history]),
        ], device=table_device())
        self.guard = IdGuard.for_tables(self.tables)
        self.item_text = ItemText(self.info, text, item, embedding_dim) if text is not None else None
        item_width = embedding_dim * (2 if self.item_text is not None else 1)
        self.user_tower = MLP(2 * embedding_dim, tower_hidden_units, output_dim)
        self.item_tower = MLP(item_width, tower_hidden_units, output_dim)
        counts = torch.from_numpy(Vocabulary.load_or_build(self.info.path).counts[item]).float() \
            if _data_at_hand(self.info) else torch.ones(self.info.num_embeddings[item])
        self.register_buffer("log_q", torch.log((counts + 1) / (counts + 1).sum()))

    # -- towers ----------------------------------------------------------------------------------
    def _lookup(self, features: dict[str, tuple[torch.Tensor, torch.Tensor]], batch_size: int) -> dict:
        """Looks up ``{feature: (ids, lengths)}``; the collection's other features go in empty."""
        keys = [self.user, self.item, self.history]
        empty = (torch.zeros(0, dtype=torch.int64), torch.zeros(batch_size, dtype=torch.int64))
        parts = [features.get(k, empty) for k in keys]
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat([v for v, _ in parts]),
                                                  lengths=torch.cat([ln for _, ln in parts]))
        return self.tables(self.guard(kjt))

    def item_vectors(self, rows: torch.Tensor) -> torch.Tensor:
        """``[n]`` item table rows → ``[n, E]`` L2-normalized item vectors."""
        ids = self._lookup({self.item: (rows, torch.ones_like(rows))}, len(rows))[self.item].values()
        if self.item_text is not None:
            ids = torch.cat([ids, self.item_text(rows)], dim=1)
        return F.normalize(self.item_tower(ids), dim=1)

    def user_vectors(self, batch: Batch) -> torch.Tensor:
        """``[B, E]`` L2-normalized user vectors from the user id and the behavior sequence."""
        user, history = batch.sparse[self.user], batch.sequences[self.history]
        looked = self._lookup({self.user: (user.values(), user.lengths().long()),
                               self.history: (history.values(), history.lengths().long())}, len(batch))
        history = looked[self.history]
        x = torch.cat([looked[self.user].values(), pool_jagged(history.values(), history.lengths(), "mean")], dim=1)
        return F.normalize(self.user_tower(x), dim=1)

    def forward(self, batch: Batch) -> torch.Tensor:
        items = batch.sparse[self.item].values()
        return (self.user_vectors(batch) * self.item_vectors(items)).sum(1) / self.temperature

    # -- training: in-batch softmax over the clicked rows ------------------------------------------
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor | None:
        clicked = batch.labels > 0.5
        if int(clicked.sum()) < 2:
            return None
        users = self.user_vectors(batch)[clicked]
        rows = batch.sparse[self.item].values()[clicked]
        items = self.item_vectors(rows)
        logits = users @ items.T / self.temperature - self.log_q[rows]  # [P, P]
        same = rows.unsqueeze(0) == rows.unsqueeze(1)  # another positive of the same item is no negative
        logits = logits.masked_fill(same & ~torch.eye(len(rows), dtype=torch.bool, device=rows.device), float("-inf"))
        loss = F.cross_entropy(logits, torch.arange(len(rows), device=rows.device))
        if not self._all_finite([loss], "loss", batch, batch_idx):
            return None
        self.log("train/loss", loss, prog_bar=True, batch_size=len(rows))
        return loss


def _data_at_hand(info: DatasetInfo) -> bool:
    from pathlib import Path

    return (Path(info.path) / "schema.yaml").exists()
