"""Unified Embedding (feature multiplexing, Coleman et al. 2023): many features, a few shared tables.

Feature f gets ``k_f`` probes. Probe i hashes the id with salt (f, i) into shared table
``i mod num_tables`` (every table has ``rows × dim``); the feature's embedding is the
concatenation of its k_f lookups, ``[B, k_f·dim]``; multi-hot features and sequences pool per
probe. A sequence uses its target's salts, so an item id lands in the same rows as a sequence
element and as the target.

The id transform is a pure KJT → KJT function (``multiplex``) that export and serving reuse;
the lookup is a torchrec ``EmbeddingBagCollection``, so DMP shards it and FBGEMM runs it.

Example (YAML, under ``model.init_args``)::

    unified: {rows: 20000, dim: 16, num_tables: 1, default_probes: 2, probes: {gender: 1}}
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
)
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from recsys.embedding.hashing import feature_salt, hash_to_rows
from recsys.embedding.tables import POOLINGS, table_device


@dataclass
class UnifiedSpec:
    """Shared-table configuration (or, with ``shared: false``, the per-feature hashing trick).

    Attributes:
        rows: rows of each shared table; with ``shared: false``, rows of each feature's own table.
        dim: width of one probe's lookup.
        num_tables: shared tables; probe i of every feature goes to table ``i mod num_tables``.
        probes: probes per feature (by the feature owning the table; sequences follow their target).
        default_probes: probes of features not in ``probes``.
        shared: false = the hashing trick: each feature hashes into a table of its own.
        feature_rows: with ``shared: false``, rows of each feature's table (default ``rows``).
    """

    rows: int
    dim: int = 16
    num_tables: int = 1
    probes: dict[str, int] = field(default_factory=dict)
    default_probes: int = 1
    shared: bool = True
    feature_rows: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, value in {"rows": self.rows, "dim": self.dim, "num_tables": self.num_tables, "default_probes": self.default_probes}.items():
            if value < 1:
                raise ValueError(f"unified.{name} must be positive, got {value}")
        bad = {f: k for f, k in self.probes.items() if k < 1}
        if bad:
            raise ValueError(f"unified.probes must be positive, got {bad}")

    def probes_of(self, owner: str) -> int:
        return self.probes.get(owner, self.default_probes)

    def table_of(self, owner: str, probe: int) -> str:
        return f"unified_{probe % self.num_tables}" if self.shared else f"hashed_{owner}"

    def rows_of(self, owner: str) -> int:
        return self.rows if self.shared else self.feature_rows.get(owner, self.rows)


def probe_name(feature: str, probe: int) -> str:
    return f"{feature}@{probe}"


def multiplex(kjt: KeyedJaggedTensor, owners: dict[str, str], spec: UnifiedSpec) -> KeyedJaggedTensor:
    """Each feature f → its probe features ``f@i`` with ids hashed into ``[0, spec.rows)``.

    ``owners`` maps a feature to the feature whose salts it uses (itself, or a sequence's target).
    Lengths are unchanged, so pooling per probe equals pooling the feature.
    """
    probes = {}
    for feature, jagged in kjt.to_dict().items():
        owner = owners[feature]
        for i in range(spec.probes_of(owner)):
            rows = hash_to_rows(jagged.values(), feature_salt(owner, i), spec.rows_of(owner))
            probes[probe_name(feature, i)] = (rows, jagged.lengths())
    keys = list(probes)
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.cat([probes[k][0] for k in keys]),
        lengths=torch.cat([probes[k][1] for k in keys]),
    )


def _assign_tables(owners: dict[str, str], spec: UnifiedSpec) -> list[tuple[str, int, list[str]]]:
    """(table name, rows, probe features) of every table the probes of ``owners`` read."""
    assigned: dict[str, list[str]] = {}
    rows: dict[str, int] = {}
    for feature, owner in owners.items():
        for i in range(spec.probes_of(owner)):
            table = spec.table_of(owner, i)
            assigned.setdefault(table, []).append(probe_name(feature, i))
            rows[table] = spec.rows_of(owner)
    return [(name, rows[name], names) for name, names in sorted(assigned.items())]


class UnifiedEmbeddingBag(nn.Module):
    """Pooled embeddings of ``features`` from shared tables: KJT in, KeyedTensor (by feature) out.

    Args:
        owners: feature → owning feature (sequences: their target), for salts and probe counts.
        spec: the shared tables and probes.
        pooling: ``sum`` or ``mean`` per probe.

    Shapes: each output feature is ``[B, k_f · spec.dim]``.
    """

    def __init__(self, owners: dict[str, str], spec: UnifiedSpec, pooling: str = "mean") -> None:
        super().__init__()
        self.owners = dict(owners)
        self.spec = spec
        self.tables = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(name=name, embedding_dim=spec.dim, num_embeddings=rows, feature_names=names,
                                   pooling=POOLINGS[pooling])
                for name, rows, names in _assign_tables(self.owners, spec)
            ],
            device=table_device(),
        )

    @property
    def num_parameters(self) -> int:
        return sum(c.num_embeddings * c.embedding_dim for c in self.tables.embedding_bag_configs())

    def output_dims(self) -> dict[str, int]:
        return {f: self.spec.probes_of(o) * self.spec.dim for f, o in self.owners.items()}

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedTensor:
        pooled = self.tables(multiplex(kjt, self.owners, self.spec)).to_dict()
        features = [f for f in kjt.keys()]
        blocks = [torch.cat([pooled[probe_name(f, i)] for i in range(self.spec.probes_of(self.owners[f]))], dim=1) for f in features]
        return KeyedTensor.from_tensor_list(features, blocks)


class UnifiedEmbeddingCollection(nn.Module):
    """Unpooled lookups of ``features`` from shared tables: KJT in, ``{feature: JaggedTensor}`` out,
    each value ``[n, k_f · spec.dim]`` (a feature's probes concatenated per id). For sequences
    and their targets (DIN)."""

    def __init__(self, owners: dict[str, str], spec: UnifiedSpec) -> None:
        super().__init__()
        self.owners = dict(owners)
        self.spec = spec
        self.tables = EmbeddingCollection(
            tables=[EmbeddingConfig(name=name, embedding_dim=spec.dim, num_embeddings=rows, feature_names=names)
                    for name, rows, names in _assign_tables(self.owners, spec)],
            device=table_device(),
        )

    def output_dims(self) -> dict[str, int]:
        return {f: self.spec.probes_of(o) * self.spec.dim for f, o in self.owners.items()}

    def forward(self, kjt: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        looked = self.tables(multiplex(kjt, self.owners, self.spec))
        out = {}
        for f in kjt.keys():
            probes = [looked[probe_name(f, i)] for i in range(self.spec.probes_of(self.owners[f]))]
            out[f] = JaggedTensor(values=torch.cat([p.values() for p in probes], dim=1), lengths=probes[0].lengths())
        return out
