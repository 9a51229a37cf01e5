"""What a model builds from beyond its hyperparameters: train counts, item texts, text encoders,
an OptEmbed search result. Passed as the model's ``resources`` argument (never a hyperparameter):
the CLI links ``CTRDataModule.resources``; ``recsys optembed`` and the export loader make their own.

A model built without resources (from a checkpoint's or a manifest's hyperparameters) opens no
file: what it would have read is in its state dict (buffers).

Example::

    resources = DatasetResources(Vocabulary.load_or_build("data/ml100k-ctr"))
    model = DIN(resources.info, resources=resources)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch

from recsys.data.arrow import open_parquet
from recsys.data.vocab import DatasetInfo, Vocabulary, vocabulary_files


class Resources:
    """The interface, with nothing available (every method says so)."""

    #: build the serving form of a model (item text as a table; exports)
    serving: bool = False

    def train_counts(self, table: str) -> np.ndarray | None:
        """``[rows]`` train occurrences per vocabulary row of ``table`` (None: not available)."""
        return None

    def item_text_states(
        self, text_feature: str, item: str, model_path: str | None, max_length: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Token states ``[L, rows, T, D]`` and mask ``[rows, T]`` of one text per row of ``item``'s table."""
        return None

    def text_encoder(self, model_path: str | None, max_length: int) -> Any:
        """A frozen ``TextEncoder`` (``texts → states, mask``), or None."""
        return None

    def optembed_result(self, artifact: str) -> dict | None:
        """The search result of ``recsys optembed search`` in ``artifact`` (dims + kept rows)."""
        return None


class DatasetResources(Resources):
    """Resources of a dataset directory (its vocabulary, train split and text cache)."""

    def __init__(self, vocab: Vocabulary) -> None:
        self.vocab = vocab
        self.data_dir = Path(vocab.data_dir)
        self._encoders: dict[tuple, Any] = {}

    @property
    def info(self) -> DatasetInfo:
        return self.vocab.info()

    def train_counts(self, table: str) -> np.ndarray | None:
        return self.vocab.counts.get(table)

    def item_texts(self, text_feature: str, item: str) -> list[str]:
        """One text per row of ``item``'s table, from the train split (the first seen per row; "" if none)."""
        texts = [""] * self.vocab.num_embeddings(item)
        for file in vocabulary_files(self.data_dir):
            table = open_parquet(file).read(columns=[item, text_feature])
            rows = self.vocab.lookup(item, table.column(item).combine_chunks())
            values = pc.fill_null(table.column(text_feature), "").to_numpy(zero_copy_only=False)
            first = np.unique(rows, return_index=True)[1]
            for row, i in zip(rows[first], first, strict=True):
                if row and not texts[row]:
                    texts[row] = str(values[i])
        return texts

    def text_encoder(self, model_path: str | None, max_length: int) -> Any:
        key = (model_path, max_length)
        if key not in self._encoders:
            from recsys.text.encoder import TextEncoder

            self._encoders[key] = TextEncoder(model_path, max_length)
        return self._encoders[key]

    def item_text_states(
        self, text_feature: str, item: str, model_path: str | None, max_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        encoder = self.text_encoder(model_path, max_length)
        return encoder.encode_cached(self.item_texts(text_feature, item), cache_dir=self.data_dir / "text_cache")

    def optembed_result(self, artifact: str) -> dict:
        from recsys.embedding.optembed import load_artifact

        return load_artifact(artifact)
