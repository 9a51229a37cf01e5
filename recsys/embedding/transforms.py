"""Id transforms between a vocabulary row and a table row: pure KJT → KJT functions.

Each id feature becomes one *lookup* per probe: ``identity`` (plain tables, OptEmbed supernet),
``hash`` (hashing trick and unified embedding: SplitMix64 with a per-(owner, probe) salt into a
table of ``rows`` rows) or ``remap`` (compact OptEmbed: kept rows → ``1..K``, pruned → 0). Lengths
never change, so pooling a probe equals pooling the feature. Training, export and serving run
this same function; docs/export_format.md writes it out for servers in other languages.

Example::

    lookups = [Lookup("user_id@0", "user_id", "user_id", 0, "h_user_id", 16, Transform("hash", salt, 500))]
    out = apply_transforms(kjt, lookups, remaps={})      # KJT keyed "user_id@0", ids in [0, 500)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from recsys.embedding.hashing import hash_to_rows

TRANSFORMS = ("identity", "hash", "remap", "managed")  # managed: the layer's ManagedIds remaps (stateful)


@dataclass(frozen=True)
class Transform:
    kind: str  # identity | hash | remap
    salt: int = 0  # hash: feature_salt(owner, probe)
    rows: int = 0  # hash: rows of the table hashed into

    def __call__(self, ids: torch.Tensor, remap: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "hash":
            return hash_to_rows(ids, self.salt, self.rows)
        if self.kind == "remap":
            return remap[ids]
        if self.kind == "managed":
            raise ValueError("managed ids are remapped by the embedding layer's ManagedIds, not a pure transform")
        return ids


@dataclass(frozen=True)
class Lookup:
    """One probe of one feature: the key it is looked up under, in which table, how its ids move."""

    key: str  # feature name in the torchrec collection
    feature: str  # the schema feature it embeds
    owner: str  # the table-owning feature (a sequence's target)
    probe: int
    table: str  # torchrec table name
    dim: int
    transform: Transform


def transform_ids(
    features: dict[str, JaggedTensor], lookups: list[Lookup], remaps: dict[str, torch.Tensor]
) -> dict[str, JaggedTensor]:
    """``{feature: ids}`` → ``{lookup key: table rows}`` (features missing from ``features`` are skipped)."""
    out = {}
    for lookup in lookups:
        jagged = features.get(lookup.feature)
        if jagged is None:
            continue
        rows = lookup.transform(jagged.values(), remaps.get(lookup.owner))
        out[lookup.key] = JaggedTensor(values=rows, lengths=jagged.lengths())
    return out


def apply_transforms(
    kjt: KeyedJaggedTensor, lookups: list[Lookup], remaps: dict[str, torch.Tensor]
) -> KeyedJaggedTensor:
    """The KJT → KJT form of ``transform_ids``: vocabulary rows keyed by feature → table rows keyed by lookup."""
    return KeyedJaggedTensor.from_jt_dict(transform_ids(kjt.to_dict(), lookups, remaps))
