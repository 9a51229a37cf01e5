"""Text vectors of items, joined to the CTR tables by the item's table row.

A schema ``text`` column holds the text of the row's item (ml100k-ctr: ``movie_title`` describes
``item_id``). ``item_texts`` collects, from the train split, one text per row of the item's table
(row 0, the OOV row, gets the empty text). ``ItemText`` encodes them once with a local
transformer (cached on disk), keeps the token states as a buffer, and turns any batch of item
rows into vectors: a pooling head (``recsys.text.pooling``) over the rows' token states, then a
linear projection, computed once per distinct row of the batch. Targets and behavior sequences
read the same rows, so DIN attends over text too.

Example (YAML, under ``model.init_args`` of ``recsys.models.din.DIN``)::

    text: {feature: movie_title, pooling: mean, combine: concat}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
from torch import Tensor, nn

from recsys.data.parquet import open_parquet, split_files
from recsys.data.schema import FeatureType
from recsys.data.vocab import DatasetInfo, Vocabulary
from recsys.text.pooling import POOLINGS, make_pooling

COMBINES = ("concat", "sum", "init")


@dataclass
class TextSpec:
    """Text features of a CTR model.

    Attributes:
        feature: the schema ``text`` column holding each row's item text.
        item: the categorical feature the text describes (default: the model's first sequence target).
        pooling: pooling head over the token states (``recsys.text.pooling.POOLINGS``).
        combine: ``concat`` (ID embedding ⊕ text vector), ``sum`` (ID embedding + text vector), or
            ``init`` (the item table starts from the text vectors, then trains as IDs only).
        dim: width of the projected text vector (default: the item table's width).
        model_path: local transformer directory (default: all-MiniLM-L6-v2).
        max_length: tokens kept per text.
    """

    feature: str
    item: str | None = None
    pooling: str = "mean"
    combine: str = "concat"
    dim: int | None = None
    model_path: str | None = None
    max_length: int = 32

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"text.pooling must be one of {list(POOLINGS)}, got {self.pooling!r}")
        if self.combine not in COMBINES:
            raise ValueError(f"text.combine must be one of {list(COMBINES)}, got {self.combine!r}")


def item_texts(data_dir: str | Path, vocab: Vocabulary, text_feature: str, item_feature: str) -> list[str]:
    """One text per row of ``item_feature``'s table, from the train split (the first seen per row)."""
    schema = vocab.schema
    if schema[text_feature].type is not FeatureType.TEXT:
        raise ValueError(f"{schema.source}: feature {text_feature!r} is not a text feature")
    if schema[item_feature].type is not FeatureType.CATEGORICAL:
        raise ValueError(f"{schema.source}: feature {item_feature!r} is not a categorical feature")
    texts = [""] * vocab.num_embeddings(item_feature)
    for file in split_files(data_dir, "train"):
        table = open_parquet(file).read(columns=[item_feature, text_feature])
        rows = vocab.lookup(item_feature, table.column(item_feature).combine_chunks())
        values = pc.fill_null(table.column(text_feature), "").to_numpy(zero_copy_only=False)
        first = np.unique(rows, return_index=True)[1]
        for row, i in zip(rows[first], first, strict=True):
            if row and not texts[row]:
                texts[row] = str(values[i])
    return texts


class ItemText(nn.Module):
    """Item rows → text vectors ``[n, dim]`` (see the module docstring)."""

    def __init__(self, info: DatasetInfo, spec: TextSpec, item: str, dim: int) -> None:
        super().__init__()
        from recsys.text.encoder import TextEncoder

        self.spec = spec
        vocab = Vocabulary.load_or_build(info.path)
        texts = item_texts(info.path, vocab, spec.feature, item)
        encoder = TextEncoder(spec.model_path, spec.max_length)
        states, mask = encoder.encode_cached(texts, cache_dir=Path(info.path) / "text_cache")
        if spec.pooling != "multilayer":
            states = states[-1:]  # single-layer heads read the last layer only
        # derived from the data at build time, so not saved in checkpoints
        self.register_buffer("states", states, persistent=False)  # [L, rows, T, D] float16
        self.register_buffer("mask", mask, persistent=False)  # [rows, T]
        self.head = make_pooling(spec.pooling, encoder.dim, num_layers=encoder.num_layers,
                                 **({"num_latents": 16} if spec.pooling == "latent" else {}))
        self.proj = nn.Linear(encoder.dim, dim)
        self.fixed = not any(p.requires_grad for p in self.head.parameters())
        if self.fixed:  # a parameter-free head: pool every row once
            with torch.no_grad():
                self.register_buffer("pooled", self._pool(torch.arange(len(texts))), persistent=False)

    def _pool(self, rows: Tensor) -> Tensor:
        states = self.states[:, rows].float()
        return self.head(states if states.shape[0] > 1 else states[0], self.mask[rows])

    def forward(self, rows: Tensor) -> Tensor:
        if self.fixed:
            return self.proj(self.pooled[rows])
        unique, inverse = torch.unique(rows, return_inverse=True)
        return self.proj(self._pool(unique))[inverse]

    @torch.no_grad()
    def initial_rows(self, std: float) -> Tensor:
        """``[rows, dim]`` start values for an ID table: the mean-pooled texts projected on their top
        principal components, scaled to ``std`` (``combine: init``)."""
        mask = self.mask.float().unsqueeze(-1)
        vectors = (self.states[-1].float() * mask).sum(1) / mask.sum(1).clamp(min=1)
        centered = vectors - vectors.mean(0)
        _, _, v = torch.linalg.svd(centered, full_matrices=False)
        dim = self.proj.out_features
        if v.shape[0] < dim:
            raise ValueError(f"text.combine=init needs at least {dim} distinct texts")
        projected = centered @ v[:dim].T
        return projected / projected.std().clamp(min=1e-8) * std
