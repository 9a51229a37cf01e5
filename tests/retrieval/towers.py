"""Small two-towers for the retrieval tests, and the in-batch softmax written out row by row."""

import numpy as np
import torch

from recsys.data.datamodule import CTRDataModule
from recsys.models.two_tower import TwoTower


def small_tower(dm: CTRDataModule, **overrides) -> TwoTower:  # noqa: ANN003
    """A seeded TwoTower over the test data's ``user``, ``item`` and ``hist_item`` (8-wide tables)."""
    torch.manual_seed(0)
    args = {"embedding": {"dim": 8}, "tower_hidden_units": [8], "output_dim": 4} | overrides
    return TwoTower(dm.dataset_info, user="user", item="item", history="hist_item", **args)


def in_batch_loss_by_hand(model: TwoTower, users: torch.Tensor, rows: torch.Tensor) -> float:
    """Sum over the clicked rows of −log softmax of their own item among the batch's other clicked items
    (``users [P, E]``, item ``rows [P]``): logits ``u · v / τ − log q``, another click of the same item
    no negative. A loop, independent of ``TwoTower.training_loss``."""
    items = model.item_vectors(rows)
    total = 0.0
    for i in range(len(rows)):
        logits = [
            float(users[i] @ items[j]) / model.temperature - float(model.log_q[rows[j]])
            for j in range(len(rows))
            if j == i or rows[j] != rows[i]
        ]
        own = float(users[i] @ items[i]) / model.temperature - float(model.log_q[rows[i]])
        total -= own - float(np.log(np.exp(logits).sum()))
    return total
