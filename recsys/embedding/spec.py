"""The ``embedding`` config block: which table kind each id feature gets, how wide and how big.

YAML, under ``model.init_args`` of any model::

    embedding:
      kind: unified        # default kind of every id feature: plain | hashed | unified | optembed | managed
      dim: 16              # width of a table (of one probe); multiples of 4
      pooling: mean        # multi-hot lists and pooled sequences: mean | sum
      budget: 0.4          # hashed / unified: a fraction of the full tables' parameters (or ``rows``)
      probes: 2            # hashed / unified: lookups per id, concatenated
      features:            # per table-owning feature, overriding the defaults above
        gender: {kind: plain}
        user_id: {kind: hashed, rows: 500, dim: 8}

Kinds. ``plain``: one table per feature, one row per vocabulary row. ``hashed``: the hashing
trick, each feature its own table of ``rows`` rows, ``probes`` salted hashes per id. ``unified``
(feature multiplexing): every feature's probes hash into ``num_tables`` shared tables of ``rows``
rows. ``optembed``: OptEmbed's supernet (``stage: supernet``: learned row pruning + sampled dims)
or its retrained compact tables (``stage: compact``, from ``artifact``, the search's output).
``managed``: ``capacity`` slots that admit an id once seen ``admit_after`` times and evict by
``eviction`` (``lru``, ``lfu``, ``decayed_lfu``) every ``interval`` steps; ids without a slot read the
last row (``recsys.embedding.managed``). It takes raw ids (``vocabulary: none``) or vocabulary rows.

A sequence reads its target's table, so it follows its target's entry. Width precedence: the
feature's entry > the schema's ``embedding_dim`` > ``dim``; unified features read the shared
tables' width ``dim``. A key that no kind in use takes is an error naming it.

The budget rule (one rule, used by every kind that takes ``budget``): the full tables have
``P = Σ_f rows_f · dim_f`` parameters; a budget ``b`` allows ``b · P``. Hashed features get
``min(rows_f, c)`` rows each, with the largest cap ``c`` that fits (max-min fair: a table smaller
than the cap keeps every row, so small tables are never starved by big ones); a table that keeps
every row is not hashed at all. Unified tables get ``⌊b · P / (num_tables · dim)⌋`` rows each.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

from recsys.data.schema import FeatureType, Schema

KINDS = ("plain", "hashed", "unified", "optembed", "managed")
EVICTIONS = ("lru", "lfu", "decayed_lfu")  # the policies recsys.embedding.managed.eviction_policy builds
STAGES = ("supernet", "compact")
TABLE_POOLINGS = ("mean", "sum")
WHERE = "model.init_args.embedding"

# layer-level keys every block takes, and those a kind brings (accepted when some feature uses that kind)
COMMON_KEYS = {"kind", "dim", "pooling", "features"}
KIND_KEYS = {
    "plain": set(),
    "hashed": {"budget", "rows", "probes"},
    "unified": {"budget", "rows", "probes", "num_tables"},
    "optembed": {
        "stage",
        "alpha",
        "threshold_init",
        "threshold_lr",
        "prune_rows",
        "sample_dims",
        "artifact",
        "budget",
        "dims",
        "kept_rows",
    },
    "managed": {"capacity", "admit_after", "eviction", "interval"},
}
FEATURE_KEYS = {
    "plain": {"kind", "dim"},
    "hashed": {"kind", "dim", "rows", "probes"},
    "unified": {"kind", "probes"},
    "optembed": {"kind", "dim"},
    "managed": {"kind", "dim", "capacity", "admit_after", "eviction", "interval"},
}

# keys of recsys < 0.2 and their new spelling (a config or checkpoint that uses one stops with this message)
LEGACY_KEYS = {
    "embedding_dim": "embedding: {dim: N}",
    "pooling": "embedding: {pooling: mean|sum}",
    "unified": "embedding: {kind: unified, dim: D, rows: R, probes: K, num_tables: T}  "
    "(unified.shared: false is now embedding: {kind: hashed, rows: R})",
    "optembed": "embedding: {kind: optembed, stage: supernet|compact, alpha: ..., artifact: SEARCH_DIR}",
}


class EmbeddingConfigError(ValueError):
    """The ``embedding`` block (or ``text`` block) is invalid; the message names the key."""


def legacy_keys_message(keys: list[str], where: str = "model.init_args") -> str | None:
    """One message for every old-style key in ``keys`` (None when there are none)."""
    old = [k for k in keys if k in LEGACY_KEYS]
    if not old:
        return None
    lines = [f"{where}.{k} is no longer a model argument; write {LEGACY_KEYS[k]}" for k in old]
    return "; ".join(lines) + " (see docs/configs.md, 'The embedding block')"


@dataclass(frozen=True)
class TablePlan:
    """How one table-owning feature is embedded: its kind, the width of a probe, the probes per
    id and the rows of the table(s) its probes read. ``hash_rows`` is None when ids index the table
    directly (plain, optembed, or a hashed feature whose budget covers its whole vocabulary)."""

    owner: str
    kind: str
    vocab_rows: int  # 0: raw ids (`vocabulary: none`), no vocabulary
    dim: int
    probes: int
    rows: int
    hash_rows: int | None = None

    @property
    def width(self) -> int:
        """Output width of one id: the probes' lookups concatenated."""
        return self.dim * self.probes


def _number(
    value: Any, key: str, kind: type, low: float | None = None, high: float | None = None, open_low: bool = False
) -> Any:
    if isinstance(value, str):  # `--model.init_args.embedding.dim 8` arrives as a string
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value).is_integer()
    if ok and low is not None:
        ok = value > low if open_low else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bounds = f" in ({low}, {high}]" if open_low else f" ≥ {low}" if low is not None else ""
        raise EmbeddingConfigError(
            f"{WHERE}.{key}: expected {'an integer' if kind is int else 'a number'}{bounds}, got {value!r}"
        )
    return kind(value)


def _width(value: Any, key: str) -> int:
    dim = _number(value, key, int, 1)
    if dim % 4:
        raise EmbeddingConfigError(
            f"{WHERE}.{key}: width {dim} is not a multiple of 4; FBGEMM's fused table kernels "
            f"(sharded training) and int8/int4 export rows need multiples of 4"
        )
    return dim


def _bool(value: Any, key: str) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise EmbeddingConfigError(f"{WHERE}.{key}: expected true or false, got {value!r}")
    return value


@dataclass
class FeatureEntry:
    """Per-feature overrides (``embedding.features.<feature>``)."""

    kind: str | None = None
    dim: int | None = None
    rows: int | None = None
    probes: int | None = None
    capacity: int | None = None  # managed: slots, the default row included
    admit_after: int | None = None
    eviction: str | None = None
    interval: int | None = None


@dataclass
class EmbeddingSpec:
    """The parsed block (see the module docstring). ``dims``/``kept_rows`` are the compact
    OptEmbed tables' searched widths and kept row counts, filled from the search artifact so that
    a compact checkpoint rebuilds without it."""

    kind: str = "plain"
    dim: int = 16
    pooling: str = "mean"
    budget: float | None = None
    rows: int | None = None
    probes: int = 1
    num_tables: int = 1
    stage: str = "supernet"
    alpha: float = 1e-5
    threshold_init: float = 0.0
    threshold_lr: float = 1e-2
    prune_rows: bool = True
    sample_dims: bool = True
    artifact: str | None = None
    dims: dict[str, int] = field(default_factory=dict)
    kept_rows: dict[str, int] = field(default_factory=dict)
    capacity: int | None = None
    admit_after: int = 1
    eviction: str = "lru"
    interval: int = 1
    features: dict[str, FeatureEntry] = field(default_factory=dict)

    # -- parsing ---------------------------------------------------------------------------------
    @classmethod
    def parse(cls, block: dict | EmbeddingSpec | None, schema: Schema) -> EmbeddingSpec:
        """Validates ``block`` against ``schema``; every error names the key at fault."""
        if isinstance(block, EmbeddingSpec):
            return block
        block = dict(block or {})
        if not all(isinstance(k, str) for k in block):
            raise EmbeddingConfigError(f"{WHERE}: keys must be strings, got {sorted(map(str, block))}")
        spec = cls()
        spec.kind = cls._kind(block.get("kind", "plain"), "kind")
        owners = {f.name: f for f in schema.tables}
        entries = block.get("features") or {}
        if not isinstance(entries, dict):
            raise EmbeddingConfigError(f"{WHERE}.features: expected a mapping feature → settings, got {entries!r}")
        for name, entry in entries.items():
            spec.features[name] = cls._entry(name, entry, schema, owners)
        kinds_used = {spec.kind_of(o) for o in owners}
        allowed = COMMON_KEYS.union(*(KIND_KEYS[k] for k in kinds_used))
        unknown = sorted(set(block) - allowed)
        if unknown:
            known = set(COMMON_KEYS).union(*KIND_KEYS.values())
            raise EmbeddingConfigError(
                f"{WHERE}.{unknown[0]}: "
                + (
                    f"not taken by the kind(s) in use {sorted(kinds_used)}"
                    if unknown[0] in known
                    else f"unknown key (known: {sorted(known)})"
                )
            )
        if "dim" in block:
            spec.dim = _width(block["dim"], "dim")
        if "pooling" in block:
            if block["pooling"] not in TABLE_POOLINGS:
                raise EmbeddingConfigError(f"{WHERE}.pooling: one of {list(TABLE_POOLINGS)}, got {block['pooling']!r}")
            spec.pooling = block["pooling"]
        if "budget" in block and "rows" in block:
            raise EmbeddingConfigError(f"{WHERE}.budget and {WHERE}.rows: give one of them, not both")
        if "budget" in block:
            spec.budget = _number(block["budget"], "budget", float, 0, 1, open_low=True)
        if "rows" in block:
            spec.rows = _number(block["rows"], "rows", int, 1)
        for key in ("probes", "num_tables"):
            if key in block:
                setattr(spec, key, _number(block[key], key, int, 1))
        for key, value in _managed_settings(block, "").items():
            setattr(spec, key, value)
        if "stage" in block:
            if block["stage"] not in STAGES:
                raise EmbeddingConfigError(f"{WHERE}.stage: one of {list(STAGES)}, got {block['stage']!r}")
            spec.stage = block["stage"]
        if "alpha" in block:
            spec.alpha = _number(block["alpha"], "alpha", float, 0)
        if "threshold_init" in block:
            spec.threshold_init = _number(block["threshold_init"], "threshold_init", float)
        if "threshold_lr" in block:
            spec.threshold_lr = _number(block["threshold_lr"], "threshold_lr", float, 0, open_low=True)
        for key in ("prune_rows", "sample_dims"):
            if key in block:
                setattr(spec, key, _bool(block[key], key))
        if block.get("artifact") is not None:
            spec.artifact = str(block["artifact"])
        for key in ("dims", "kept_rows"):
            values = dict(block.get(key) or {})
            unknown = sorted(set(values) - set(owners))
            if unknown:
                raise EmbeddingConfigError(f"{WHERE}.{key}.{unknown[0]}: not a table-owning feature of {schema.source}")
            if key == "dims":
                spec.dims = {k: _width(v, f"dims.{k}") for k, v in values.items()}
            else:
                spec.kept_rows = {k: _number(v, f"kept_rows.{k}", int, 0) for k, v in values.items()}
        if set(spec.dims) != set(spec.kept_rows):
            lacking = sorted(set(spec.dims) ^ set(spec.kept_rows))
            raise EmbeddingConfigError(
                f"{WHERE}.dims / kept_rows: both name the same tables (a compact checkpoint "
                f"writes them together); {lacking} in only one"
            )
        if "hashed" in kinds_used or "unified" in kinds_used:
            needs_size = [
                o
                for o in owners
                if spec.kind_of(o) == "unified"
                or (spec.kind_of(o) == "hashed" and spec.features.get(o, FeatureEntry()).rows is None)
            ]
            if needs_size and spec.budget is None and spec.rows is None:
                raise EmbeddingConfigError(
                    f"{WHERE}.budget: kind {spec.kind_of(needs_size[0])!r} of feature "
                    f"{needs_size[0]!r} needs a size: budget (a fraction of the full tables' "
                    f"parameters) or rows"
                )
        spec._check_entries()
        spec._check_raw(schema)
        for owner in owners:
            if spec.kind_of(owner) == "managed" and spec.managed(owner)["capacity"] is None:
                raise EmbeddingConfigError(
                    f"{WHERE}.features.{owner}.capacity: kind 'managed' needs a capacity (slots, the shared "
                    f"default row included), here or as embedding.capacity"
                )
        return spec

    def managed(self, owner: str) -> dict[str, Any]:
        """``capacity``, ``admit_after``, ``eviction``, ``interval`` of a managed table (entry, else block)."""
        entry = self.features.get(owner, FeatureEntry())
        keys = ("capacity", "admit_after", "eviction", "interval")
        return {k: getattr(entry, k) if getattr(entry, k) is not None else getattr(self, k) for k in keys}

    def _check_raw(self, schema: Schema) -> None:
        """Features with ``vocabulary: none`` (raw int64 ids) need a kind that hashes them into rows it
        knows the size of; refused here, when the config is parsed, with the reason."""
        for owner in schema.tables:
            if not owner.raw:
                continue
            kind, entry = self.kind_of(owner.name), self.features.get(owner.name, FeatureEntry())
            key = f"features.{owner.name}.kind" if entry.kind else "kind"
            if kind in ("plain", "optembed"):
                raise EmbeddingConfigError(
                    f"{WHERE}.{key}: feature {owner.name!r} has `vocabulary: none` in {schema.source} (raw "
                    f"ids, no vocabulary), and kind {kind!r} has one row per vocabulary row; use kind hashed, "
                    f"unified or managed for it (embedding.features.{owner.name}: {{kind: hashed, rows: N}})"
                )
            sized = entry.rows is not None or self.rows is not None
            if kind in ("hashed", "unified") and not sized:
                where = f"features.{owner.name}.rows" if kind == "hashed" else "rows"
                raise EmbeddingConfigError(
                    f"{WHERE}.{where}: feature {owner.name!r} has `vocabulary: none` in {schema.source}, so "
                    f"there are no full tables for a budget to be a fraction of; give kind {kind!r} its rows"
                )

    @staticmethod
    def _kind(value: Any, key: str) -> str:
        if value not in KINDS:
            raise EmbeddingConfigError(f"{WHERE}.{key}: unknown kind {value!r} (kinds: {list(KINDS)})")
        return value

    @classmethod
    def _entry(cls, name: str, entry: Any, schema: Schema, owners: dict) -> FeatureEntry:
        where = f"features.{name}"
        if name not in owners:
            try:
                spec = schema[name]
            except KeyError:
                raise EmbeddingConfigError(f"{WHERE}.{where}: no feature {name!r} in {schema.source}") from None
            if spec.type is FeatureType.SEQUENCE:
                raise EmbeddingConfigError(
                    f"{WHERE}.{where}: a sequence reads its target's table; set it on features.{spec.target}"
                )
            raise EmbeddingConfigError(f"{WHERE}.{where}: {name!r} is a {spec.type.value} feature and has no table")
        if not isinstance(entry, dict):
            raise EmbeddingConfigError(f"{WHERE}.{where}: expected a mapping, got {entry!r}")
        unknown = sorted(set(entry) - set(FeatureEntry.__dataclass_fields__))
        if unknown:
            raise EmbeddingConfigError(
                f"{WHERE}.{where}.{unknown[0]}: unknown key (a feature takes "
                f"{sorted(FeatureEntry.__dataclass_fields__)})"
            )
        out = FeatureEntry()
        if "kind" in entry:
            out.kind = cls._kind(entry["kind"], f"{where}.kind")
        if "dim" in entry:
            out.dim = _width(entry["dim"], f"{where}.dim")
        for key in ("rows", "probes"):
            if key in entry:
                setattr(out, key, _number(entry[key], f"{where}.{key}", int, 1))
        for key, value in _managed_settings(entry, f"{where}.").items():
            setattr(out, key, value)
        return out

    def kind_of(self, owner: str) -> str:
        entry = self.features.get(owner)
        return entry.kind if entry is not None and entry.kind else self.kind

    def _check_entries(self) -> None:
        for name, entry in self.features.items():
            kind = self.kind_of(name)
            given = {k for k, v in asdict(entry).items() if v is not None}
            extra = sorted(given - FEATURE_KEYS[kind])
            if extra:
                raise EmbeddingConfigError(
                    f"{WHERE}.features.{name}.{extra[0]}: not taken by kind {kind!r}"
                    + (
                        " (unified features read the shared tables' width embedding.dim)"
                        if extra[0] == "dim" and kind == "unified"
                        else ""
                    )
                )

    # -- resolution against the dataset ----------------------------------------------------------
    def plans(self, schema: Schema, num_embeddings: dict[str, int]) -> dict[str, TablePlan]:
        """One ``TablePlan`` per table-owning feature, in schema order (the budget rule applied)."""
        plans: dict[str, TablePlan] = {}
        owners = schema.tables
        hashed_budget: dict[str, int] = {}
        for owner in owners:
            name, kind = owner.name, self.kind_of(owner.name)
            entry = self.features.get(name, FeatureEntry())
            if kind != "unified" and entry.dim is None and owner.embedding_dim is not None and owner.embedding_dim % 4:
                raise EmbeddingConfigError(
                    f"{schema.source}: feature {name!r}: embedding_dim {owner.embedding_dim} is not "
                    f"a multiple of 4; FBGEMM's fused table kernels and int8/int4 export rows need "
                    f"multiples of 4 (or set {WHERE}.features.{name}.dim)"
                )
            dim = self.dim if kind == "unified" else entry.dim or owner.embedding_dim or self.dim
            vocab = num_embeddings[name]
            probes = (entry.probes or self.probes) if kind in ("hashed", "unified") else 1
            rows = vocab
            if kind == "optembed" and self.stage == "compact" and name in self.dims:
                dim, rows = self.dims[name], self.kept_rows[name] + 1  # the searched width, kept rows + the zero row
            if kind == "managed":
                rows = self.managed(name)["capacity"]
            plans[name] = TablePlan(name, kind, vocab, dim, probes, rows)
            if kind == "hashed":
                if entry.rows is not None:
                    plans[name] = _hashed(plans[name], entry.rows)
                elif self.rows is not None:
                    plans[name] = _hashed(plans[name], self.rows)
                else:
                    hashed_budget[name] = vocab
        if hashed_budget:
            caps = _fair_rows({o: (n, plans[o].dim) for o, n in hashed_budget.items()}, self.budget)
            for name, rows in caps.items():
                plans[name] = _hashed(plans[name], rows)
        unified = [o for o in plans if plans[o].kind == "unified"]
        if unified:
            shared = self.rows
            if shared is None:
                full = sum(plans[o].vocab_rows * self.dim for o in unified)
                shared = math.floor(self.budget * full / (self.num_tables * self.dim))
                if shared < 1:
                    raise EmbeddingConfigError(
                        f"{WHERE}.budget: {self.budget} of the unified features' {full:,} "
                        f"parameters leaves the shared tables no rows; raise it"
                    )
            for o in unified:
                plans[o] = TablePlan(o, "unified", plans[o].vocab_rows, self.dim, plans[o].probes, shared, shared)
        return plans

    def to_dict(self) -> dict[str, Any]:
        """The block as the user would write it (defaults left out), for hparams and manifests."""
        default = EmbeddingSpec()
        out: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if key == "features":
                value = {f: {k: v for k, v in e.items() if v is not None} for f, e in value.items()}
            if value != getattr(default, key) and value not in ({}, None):
                out[key] = value
        return out


def _managed_settings(block: dict, where: str) -> dict[str, Any]:
    """The managed kind's keys present in ``block`` (the embedding block or a feature's entry), validated."""
    out: dict[str, Any] = {}
    if "capacity" in block:
        out["capacity"] = _number(block["capacity"], f"{where}capacity", int, 2)
    if "admit_after" in block:
        out["admit_after"] = _number(block["admit_after"], f"{where}admit_after", int, 1)
    if "interval" in block:
        out["interval"] = _number(block["interval"], f"{where}interval", int, 1)
    if "eviction" in block:
        if block["eviction"] not in EVICTIONS:
            raise EmbeddingConfigError(f"{WHERE}.{where}eviction: one of {list(EVICTIONS)}, got {block['eviction']!r}")
        out["eviction"] = block["eviction"]
    return out


def _hashed(plan: TablePlan, rows: int) -> TablePlan:
    # the table holds every row: no collisions to accept (raw ids, vocab_rows 0, are always hashed)
    direct = plan.vocab_rows > 0 and rows >= plan.vocab_rows and plan.probes == 1
    rows = plan.vocab_rows if direct else rows
    return TablePlan(plan.owner, "hashed", plan.vocab_rows, plan.dim, plan.probes, rows, None if direct else rows)


def _fair_rows(tables: dict[str, tuple[int, int]], budget: float) -> dict[str, int]:
    """Max-min fair rows under ``budget`` (see the module docstring): ``{table: min(rows, cap)}``."""
    full = sum(rows * dim for rows, dim in tables.values())
    allowed = budget * full

    def cost(cap: int) -> int:
        return sum(min(rows, cap) * dim for rows, dim in tables.values())

    low, high = 0, max(rows for rows, _ in tables.values())
    while low < high:  # the largest cap whose cost fits
        mid = (low + high + 1) // 2
        low, high = (mid, high) if cost(mid) <= allowed else (low, mid - 1)
    if low < 1:
        smallest = sum(dim for _, dim in tables.values()) / full
        raise EmbeddingConfigError(
            f"{WHERE}.budget: {budget} leaves feature {next(iter(tables))!r} no rows "
            f"(one row per hashed table needs a budget ≥ {smallest:.2g})"
        )
    return {name: min(rows, low) for name, (rows, _) in tables.items()}
