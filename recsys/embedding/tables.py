"""Plain embedding tables: one torchrec table per id feature, sequences sharing their target's.

Example::

    info = DatasetInfo.from_any(datamodule.dataset_info)
    tables = pooled_tables(info, embedding_dim=16, pooling="mean")
    guard = IdGuard.for_tables(tables)
    pooled = tables(guard(kjt))          # KeyedTensor, one [B, D_f] block per feature
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recsys.data.schema import FeatureType
from recsys.data.vocab import DatasetInfo

POOLINGS = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}


def table_configs(
    info: DatasetInfo,
    embedding_dim: int,
    pooling: str = "sum",
    include_sequences: bool = True,
    features: list[str] | None = None,
) -> list[EmbeddingBagConfig]:
    """One ``EmbeddingBagConfig`` per table-owning feature (all, or those in ``features``);
    with ``include_sequences`` its sequences read the same table, pooled.

    A feature's ``embedding_dim`` in the schema overrides ``embedding_dim``.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {sorted(POOLINGS)}, got {pooling!r}")
    schema = info.parsed_schema
    configs = []
    for owner in schema.tables:
        if features is not None and owner.name not in features:
            continue
        readers = [owner.name]
        if include_sequences and owner.type is FeatureType.CATEGORICAL:
            readers += [s.name for s in schema.sequences if s.target == owner.name]
        configs.append(
            EmbeddingBagConfig(
                name=f"t_{owner.name}",
                embedding_dim=owner.embedding_dim or embedding_dim,
                num_embeddings=info.num_embeddings[owner.name],
                feature_names=readers,
                pooling=POOLINGS[pooling],
            )
        )
    return configs


_TABLE_DEVICE: ContextVar[torch.device | None] = ContextVar("recsys_table_device", default=None)


@contextmanager
def tables_on(device: torch.device | str) -> Iterator[None]:
    """Models built inside this context create their embedding tables on ``device``.

    ``tables_on("meta")`` allocates nothing: the torchrec strategy then materialises only each
    rank's shards (tables larger than one host). Dense layers are built as usual.
    """
    token = _TABLE_DEVICE.set(torch.device(device))
    try:
        yield
    finally:
        _TABLE_DEVICE.reset(token)


def table_device() -> torch.device | None:
    """The device tables are built on (None: the default device)."""
    return _TABLE_DEVICE.get()


def pooled_tables(info: DatasetInfo, embedding_dim: int, pooling: str = "sum") -> EmbeddingBagCollection:
    """An ``EmbeddingBagCollection`` over every id feature (sequences pooled in their target's table)."""
    return EmbeddingBagCollection(tables=table_configs(info, embedding_dim, pooling), device=table_device())


def pooled_tables_for(
    info: DatasetInfo, features: list[str], embedding_dim: int, pooling: str = "sum"
) -> EmbeddingBagCollection | None:
    """An ``EmbeddingBagCollection`` over just ``features`` (no sequences), or None if empty."""
    if not features:
        return None
    configs = table_configs(info, embedding_dim, pooling, include_sequences=False, features=features)
    return EmbeddingBagCollection(tables=configs, device=table_device())


def feature_order(tables: EmbeddingBagCollection) -> list[str]:
    """Pooled output features in the unsharded collection's order (table by table)."""
    return [f for config in tables.embedding_bag_configs() for f in config.feature_names]


def concat_pooled(pooled: KeyedTensor, order: list[str]) -> torch.Tensor:
    """``[B, Σ D_f]`` with features in ``order``. A sharded collection may emit its features in
    another order (grouped by sharding type), so positions are never taken for granted."""
    if pooled.keys() == order:
        return pooled.values()
    blocks = pooled.to_dict()
    return torch.cat([blocks[f] for f in order], dim=1)


class IdGuard(nn.Module):
    """Stops a batch whose ids fall outside their table before any embedding kernel sees it.

    FBGEMM kernels do not bounds-check; an out-of-range id reads or corrupts another row.
    The check is one vectorised comparison over the KJT's values.
    """

    def __init__(self, rows_per_feature: dict[str, int]) -> None:
        super().__init__()
        self.rows_per_feature = dict(rows_per_feature)

    @classmethod
    def for_tables(cls, *collections: EmbeddingBagCollection | EmbeddingCollection) -> IdGuard:
        rows = {}
        for collection in collections:
            configs = (
                collection.embedding_bag_configs()
                if isinstance(collection, EmbeddingBagCollection)
                else collection.embedding_configs()
            )
            rows.update({f: t.num_embeddings for t in configs for f in t.feature_names})
        return cls(rows)

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        keys = kjt.keys()
        unknown = [k for k in keys if k not in self.rows_per_feature]
        if unknown:
            raise KeyError(f"features {unknown} have no embedding table (known: {sorted(self.rows_per_feature)})")
        values = kjt.values()
        if values.numel() == 0:
            return kjt
        counts = torch.tensor(kjt.length_per_key(), device=values.device)
        bounds = torch.tensor([self.rows_per_feature[k] for k in keys], device=values.device)
        limit = torch.repeat_interleave(bounds, counts, output_size=values.numel())
        bad = (values < 0) | (values >= limit)
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            key = keys[int(torch.searchsorted(torch.cumsum(counts, 0), first, right=True))]
            raise IndexError(
                f"feature {key!r}: id {int(values[first])} outside its table of "
                f"{self.rows_per_feature[key]} rows ({int(bad.sum())} bad ids in this batch); "
                f"is the checkpoint's vocabulary the dataset's?"
            )
        return kjt
