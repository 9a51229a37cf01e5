"""The dataset contract: ``schema.yaml`` parsed into typed, validated specs.

Example::

    schema = load_schema("data/ml100k-ctr")
    schema.label                      # "label"
    [f.name for f in schema.sparse]   # pooled id features (categorical, categorical_list)
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)


class SchemaError(ValueError):
    """A dataset does not satisfy the contract; the message names the file and key or column."""


class FeatureType(StrEnum):
    CATEGORICAL = "categorical"
    CATEGORICAL_LIST = "categorical_list"
    NUMERIC = "numeric"
    SEQUENCE = "sequence"
    TEXT = "text"


ID_TYPES = (FeatureType.CATEGORICAL, FeatureType.CATEGORICAL_LIST, FeatureType.SEQUENCE)
_KNOWN_KEYS = {
    "name",
    "type",
    "target",
    "max_len",
    "min_count",
    "num_buckets",
    "embedding_dim",
    "missing",
    "item",
    "vocabulary",
}
RAW_VOCABULARY = "none"  # `vocabulary: none`: raw ids straight to the table, no vocabulary (see FeatureSpec.raw)
MISSING_POLICIES = ("error", "mean", "zero")


@dataclass(frozen=True)
class FeatureSpec:
    """One column of the dataset and how it enters the model."""

    name: str
    type: FeatureType
    target: str | None = None  # sequence only: the categorical feature whose table it shares
    max_len: int | None = None  # sequence only: keep the most recent max_len items
    min_count: int = 1  # ids seen fewer times in train map to the OOV row
    num_buckets: int | None = None  # hash ids into this many rows instead of a vocabulary
    embedding_dim: int | None = None  # overrides the model's default dimension
    missing: str = "error"  # numeric only: a null/NaN/inf value stops the run ("error") or becomes the train mean or 0
    item: str | None = None  # text only: the categorical feature the text describes (item text); none: row-level text
    vocabulary: str | None = None  # "none": raw ids (see ``raw``); unset: a vocabulary built from train

    @property
    def raw(self) -> bool:
        """``vocabulary: none``: the column's ids go to the table as int64 with no vocabulary and no pass
        over the data (integers as they are; strings and uint64 through a stable 64-bit hash, see
        ``recsys.data.vocab.raw_ids``); only table kinds that hash or manage ids take them."""
        return self.vocabulary == RAW_VOCABULARY

    @property
    def table(self) -> str:
        """Name of the embedding table this feature reads (a sequence reads its target's)."""
        return self.target if self.type is FeatureType.SEQUENCE else self.name

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if v is not None}
        d["type"] = self.type.value
        if d.get("min_count") == 1:
            del d["min_count"]
        if d.get("missing") == "error":
            del d["missing"]
        return d


@dataclass(frozen=True)
class Schema:
    label: str
    features: tuple[FeatureSpec, ...]
    group: str | None = None
    source: str = "<schema>"  # the file it was read from, for error messages

    def __getitem__(self, name: str) -> FeatureSpec:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"{self.source}: no feature named {name!r}")

    def of_type(self, *types: FeatureType) -> list[FeatureSpec]:
        return [f for f in self.features if f.type in types]

    @property
    def sparse(self) -> list[FeatureSpec]:
        """Pooled id features, in schema order (the keys of ``Batch.sparse``)."""
        return self.of_type(FeatureType.CATEGORICAL, FeatureType.CATEGORICAL_LIST)

    @property
    def sequences(self) -> list[FeatureSpec]:
        """Behavior sequences, in schema order (the keys of ``Batch.sequences``)."""
        return self.of_type(FeatureType.SEQUENCE)

    @property
    def numeric(self) -> list[FeatureSpec]:
        return self.of_type(FeatureType.NUMERIC)

    @property
    def text(self) -> list[FeatureSpec]:
        return self.of_type(FeatureType.TEXT)

    @property
    def item_text(self) -> list[FeatureSpec]:
        """Text columns that describe an item (``item: <categorical feature>``): one text per table row."""
        return [f for f in self.text if f.item is not None]

    @property
    def row_text(self) -> list[FeatureSpec]:
        """Text columns of the row itself (no ``item:``): the keys of ``Batch.text``."""
        return [f for f in self.text if f.item is None]

    @property
    def tables(self) -> list[FeatureSpec]:
        """The features that own a table (one per categorical/categorical_list feature)."""
        return self.sparse

    def sequence_groups(self, groups: list[list[str]] | None, model: str) -> tuple[dict[str, str], list[list[str]]]:
        """``({sequence: its target feature}, groups)`` for a model that reads behaviors against their target
        (DIN, BST): every sequence in exactly one group; default one group of all, in schema order."""
        if not self.sequences:
            raise ValueError(f"{self.source}: {model} needs at least one 'sequence' feature; use EmbeddingMLP instead")
        target_of = {s.name: s.target for s in self.sequences}
        groups = groups or [list(target_of)]
        grouped = [s for group in groups for s in group]
        if len(grouped) != len(set(grouped)) or set(grouped) != set(target_of):
            raise ValueError(
                f"attention_groups must list each sequence feature {sorted(target_of)} exactly once, got {groups}"
            )
        return target_of, groups

    def columns(self) -> list[str]:
        """Every Parquet column the contract reads."""
        cols = [self.label] + [f.name for f in self.features]
        if self.group and self.group not in cols:
            cols.append(self.group)
        return cols

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"label": self.label}
        if self.group:
            d["group"] = self.group
        d["features"] = [f.to_dict() for f in self.features]
        return d


def _positive_int(value: Any, where: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SchemaError(f"{where}: {key!r} must be a positive integer, got {value!r}")
    return value


def parse_schema(raw: Any, source: str = "<schema>") -> Schema:
    """Validates a parsed ``schema.yaml`` document; every error names ``source`` and the key."""
    if not isinstance(raw, dict):
        raise SchemaError(f"{source}: expected a mapping with 'label' and 'features'")
    for key in ("label", "features"):
        if key not in raw:
            raise SchemaError(f"{source}: missing required key {key!r}")
    unknown_top = set(raw) - {"label", "group", "features"}
    if unknown_top:
        raise SchemaError(f"{source}: unknown top-level key(s) {sorted(unknown_top)}")
    if not isinstance(raw["features"], list) or not raw["features"]:
        raise SchemaError(f"{source}: 'features' must be a non-empty list")

    features: list[FeatureSpec] = []
    seen: set[str] = set()
    for i, item in enumerate(raw["features"]):
        where = f"{source}: features[{i}]"
        if not isinstance(item, dict) or "name" not in item or "type" not in item:
            raise SchemaError(f"{where}: each feature needs 'name' and 'type', got {item!r}")
        name = str(item["name"])
        where = f"{source}: feature {name!r}"
        if name in seen:
            raise SchemaError(f"{where}: declared twice")
        seen.add(name)
        unknown = set(item) - _KNOWN_KEYS
        if unknown:
            raise SchemaError(f"{where}: unknown key(s) {sorted(unknown)}")
        try:
            ftype = FeatureType(item["type"])
        except ValueError:
            allowed = ", ".join(t.value for t in FeatureType)
            raise SchemaError(f"{where}: unknown feature type {item['type']!r} (allowed: {allowed})") from None
        kwargs: dict[str, Any] = {}
        for key in ("max_len", "min_count", "num_buckets", "embedding_dim"):
            if key in item:
                kwargs[key] = _positive_int(item[key], where, key)
        if ftype is FeatureType.SEQUENCE:
            if "target" not in item:
                raise SchemaError(f"{where}: a sequence needs 'target' (the categorical feature whose table it shares)")
            kwargs["target"] = str(item["target"])
            kwargs.setdefault("max_len", 50)
            for key in ("min_count", "num_buckets"):
                if key in kwargs:
                    raise SchemaError(f"{where}: {key!r} belongs on the target feature {kwargs['target']!r}")
        else:
            if "target" in item or "max_len" in item:
                raise SchemaError(f"{where}: 'target'/'max_len' are only for sequence features")
        if "item" in item:
            if ftype is not FeatureType.TEXT:
                raise SchemaError(f"{where}: 'item' applies to text features only (the item the text describes)")
            kwargs["item"] = str(item["item"])
        if "missing" in item:
            if ftype is not FeatureType.NUMERIC:
                raise SchemaError(f"{where}: 'missing' applies to numeric features only")
            if item["missing"] not in MISSING_POLICIES:
                raise SchemaError(f"{where}: missing must be one of {list(MISSING_POLICIES)}, got {item['missing']!r}")
            kwargs["missing"] = item["missing"]
        if "vocabulary" in item:
            if item["vocabulary"] != RAW_VOCABULARY:
                raise SchemaError(
                    f"{where}: vocabulary: {item['vocabulary']!r} is not understood; the key takes exactly "
                    f"`vocabulary: none` (raw ids, no vocabulary); leave it out to build a vocabulary from train"
                )
            if ftype not in (FeatureType.CATEGORICAL, FeatureType.CATEGORICAL_LIST):
                raise SchemaError(
                    f"{where}: `vocabulary: none` goes on a categorical or categorical_list feature"
                    + (
                        f" (a sequence reads its target's table: set it on {item.get('target')!r})"
                        if ftype is FeatureType.SEQUENCE
                        else ""
                    )
                )
            clash = sorted({"min_count", "num_buckets"} & set(kwargs))
            if clash:
                raise SchemaError(
                    f"{where}: {clash[0]!r} needs a vocabulary (it is applied while one is built from train); "
                    f"`vocabulary: none` has none: drop one of them"
                )
            kwargs["vocabulary"] = RAW_VOCABULARY
        if ftype in (FeatureType.NUMERIC, FeatureType.TEXT):
            extra = {"min_count", "num_buckets", "embedding_dim"} & set(kwargs)
            if extra:
                raise SchemaError(f"{where}: {sorted(extra)} do not apply to {ftype.value} features")
        features.append(FeatureSpec(name=name, type=ftype, **kwargs))

    by_name = {f.name: f for f in features}
    for f in features:
        if f.type is FeatureType.SEQUENCE:
            target = by_name.get(f.target)  # type: ignore[arg-type]
            if target is None or target.type is not FeatureType.CATEGORICAL:
                raise SchemaError(
                    f"{source}: feature {f.name!r}: sequence target {f.target!r} must be a declared categorical feature"
                )
        if f.type is FeatureType.TEXT and f.item is not None:
            described = by_name.get(f.item)
            if described is None or described.type is not FeatureType.CATEGORICAL:
                raise SchemaError(
                    f"{source}: feature {f.name!r}: item {f.item!r} must be a declared categorical feature"
                )
            if described.raw:
                raise SchemaError(
                    f"{source}: feature {f.name!r}: item text is joined to its item's vocabulary rows, and "
                    f"{f.item!r} has `vocabulary: none`; give {f.item!r} a vocabulary or make the text row-level"
                )
    label = str(raw["label"])
    if label in by_name:
        raise SchemaError(f"{source}: label column {label!r} is also declared as a feature")
    group = raw.get("group")
    return Schema(label=label, features=tuple(features), group=None if group is None else str(group), source=source)


def load_schema(path: str | Path) -> Schema:
    """Reads ``<dir>/schema.yaml`` (or the file itself)."""
    path = Path(path)
    file = path / "schema.yaml" if path.is_dir() else path
    if not file.exists():
        raise SchemaError(f"{file}: schema file not found (a dataset directory needs schema.yaml)")
    try:
        raw = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        raise SchemaError(f"{file}: not valid YAML: {err}") from err
    return parse_schema(raw, source=str(file))
