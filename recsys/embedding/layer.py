"""``EmbeddingLayer``: the one embedding component of every model, whatever the table kind.

::

    Batch.sparse + Batch.sequences ──check ids──▶ id transforms per probe (identity | hash | remap)
        ├─▶ torchrec EmbeddingBagCollection: tables whose readers are all pooled (FBGEMM pools them)
        └─▶ torchrec EmbeddingCollection per width: tables some reader needs row by row (a feature the
            model keeps jagged, OptEmbed's row masks, item text joined per id)
    per feature: its probes concatenated ─▶ OptEmbed masks ─▶ ⊕ item text ─▶ pooled [B, W_f] or
    jagged [N, W_f] (the features the model asked to keep)
    Batch.text (row-level text) ─▶ RowText ─▶ one more pooled feature [B, W_t]

The kinds (``recsys.embedding.spec``) differ only in the tables they declare, the transform of
each probe and OptEmbed's masks; a model never sees which kind it got. All tables are torchrec
collections, so ``DistributedModelParallel`` shards any of them and FBGEMM runs them; the export
loader swaps them for torchrec's quantized twins and runs this same forward.

Example::

    layer = EmbeddingLayer(info, {"kind": "unified", "budget": 0.4}, jagged=["item_id", "hist_item_id"])
    out = layer(batch)
    out.pooled["user_id"]           # [B, W]
    out.jagged["hist_item_id"]      # JaggedTensor: values [N, W], lengths [B]
    layer.output_dims()             # {feature: W_f}
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
)
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from recsys.data.batch import Batch
from recsys.data.schema import FeatureType
from recsys.data.vocab import DatasetInfo
from recsys.embedding.hashing import feature_salt
from recsys.embedding.managed import ManagedIds
from recsys.embedding.optembed import Supernet, compact_remap
from recsys.embedding.regularization import inverse_counts, mba_penalty_from_lookups, table_counts
from recsys.embedding.spec import WHERE, EmbeddingConfigError, EmbeddingSpec, TablePlan
from recsys.embedding.tables import TORCHREC_POOLING, check_ids, pool_jagged, table_device
from recsys.embedding.transforms import Lookup, Transform, transform_ids
from recsys.text.features import ItemText, ItemTextTable, RowText, TextConfigError, TextSpec


@dataclass
class Embedded:
    """The layer's output for one batch."""

    pooled: dict[str, Tensor] = field(default_factory=dict)  # feature -> [B, W_f]
    jagged: dict[str, JaggedTensor] = field(default_factory=dict)  # feature -> values [N, W_f], lengths [B]

    def cat(self, features: list[str]) -> Tensor:
        """``[B, Σ W_f]``: the pooled features in the given order."""
        return torch.cat([self.pooled[f] for f in features], dim=1)


def _table_name(plan: TablePlan, probe: int, num_tables: int) -> str:
    if plan.kind == "unified":
        return f"unified_{probe % num_tables}"
    return {"hashed": "h_", "managed": "m_"}.get(plan.kind, "t_") + plan.owner


class EmbeddingLayer(nn.Module):
    """Id features (and text) of a dataset → per-feature embeddings, for any table kind.

    Args:
        info: the dataset's schema and table sizes.
        embedding: the ``embedding`` config block (``recsys.embedding.spec``).
        text: the ``text`` config block (``recsys.text.features.TextSpec``), or None: no text.
        features: the id features to embed (default: every categorical, list and sequence feature).
        jagged: features returned row by row instead of pooled (DIN's targets and sequences).
        mba_lambda: mini-batch aware L2 on the rows a training batch looks up (0: off).
        resources: train counts, item texts, encoders and OptEmbed results
            (``recsys.data.resources``); None when a state dict follows (a checkpoint or export).
    """

    def __init__(
        self,
        info: DatasetInfo,
        embedding: dict | EmbeddingSpec | None = None,
        text: dict | TextSpec | None = None,
        features: list[str] | None = None,
        jagged: list[str] | tuple = (),
        mba_lambda: float = 0.0,
        resources=None,
    ) -> None:  # noqa: ANN001 (recsys.data.resources.Resources)
        super().__init__()
        schema = info.parsed_schema
        self.schema = schema
        self.spec = EmbeddingSpec.parse(embedding, schema)
        ids = [f.name for f in (*schema.sparse, *schema.sequences)]
        self.id_features = ids if features is None else list(features)
        unknown = [f for f in [*self.id_features, *jagged] if f not in ids]
        if unknown:
            raise EmbeddingConfigError(
                f"{WHERE}: {unknown[0]!r} is not an id feature of {schema.source} (id features: {ids})"
            )
        self.jagged_features = [f for f in self.id_features if f in set(jagged)]
        self.owner = {f: schema[f].table for f in self.id_features}
        owners = list(dict.fromkeys(self.owner.values()))
        self._vocab_rows = dict(info.num_embeddings)
        self._resolve_compact(owners, resources)
        self.plans = {o: p for o, p in self.spec.plans(schema, info.num_embeddings).items() if o in owners}
        # the id guard's bounds; raw ids (`vocabulary: none`) are any int64, hashed before any table sees them
        self.vocab_rows = {f: info.num_embeddings[o] for f, o in self.owner.items() if not schema[o].raw}
        self.pooling = self.spec.pooling
        self.mba_lambda = mba_lambda
        self.text_spec = TextSpec.parse(text)
        self._build_text(schema, resources)
        self._build_lookups()
        self._build_tables()
        self._build_optembed(resources)
        self._build_managed()
        if mba_lambda > 0:
            self._build_counts(resources)
        self._mba_terms: dict[str, tuple[list[Tensor], list[Tensor]]] = {}
        self.nonfinite_gradient = False  # set by the backward of a step's lookups (see _GradientGuard)
        self.pooled_features = [f for f in self.id_features if f not in self.jagged_features] + list(self.row_text)

    # -- construction --------------------------------------------------------------------------------
    def _resolve_compact(self, owners: list[str], resources) -> None:  # noqa: ANN001
        """Compact OptEmbed tables take their widths and kept rows from the search artifact (read by the
        resources, once); they are then part of the spec, so a checkpoint rebuilds without it."""
        self._kept = None
        compact = [o for o in owners if self.spec.kind_of(o) == "optembed" and self.spec.stage == "compact"]
        if not compact or all(o in self.spec.dims for o in compact):
            return
        if self.spec.artifact is None:
            raise EmbeddingConfigError(
                f"{WHERE}.artifact: stage compact needs the OptEmbed search artifact "
                f"(the `recsys optembed search --out` directory)"
            )
        result = resources.optembed_result(self.spec.artifact) if resources is not None else None
        if result is None:
            raise EmbeddingConfigError(
                f"{WHERE}.artifact: {self.spec.artifact} can only be read with the dataset's "
                f"resources (recsys fit / recsys optembed run)"
            )
        missing = [o for o in compact if o not in result["dims"]]
        if missing:
            raise EmbeddingConfigError(
                f"{WHERE}.artifact: {self.spec.artifact} has no searched width for table "
                f"{missing[0]!r} (searched: {sorted(result['dims'])})"
            )
        self._kept = {o: torch.as_tensor(result["kept"][o]).bool() for o in compact}
        for o, kept in self._kept.items():
            rows = self._vocab_rows[o]
            if kept.numel() != rows:
                raise EmbeddingConfigError(
                    f"{WHERE}.artifact: {self.spec.artifact} was searched on a table {o!r} of "
                    f"{kept.numel()} rows; this dataset's has {rows} (another dataset or "
                    f"vocabulary): search again on this one"
                )
        self.spec.dims = {o: int(result["dims"][o]) for o in compact}
        self.spec.kept_rows = {o: int(self._kept[o].sum()) for o in compact}

    def _build_text(self, schema, resources) -> None:  # noqa: ANN001
        self.item_text, self.row_text = nn.ModuleDict(), nn.ModuleDict()
        self.text_dims: dict[str, int] = {}
        self._init_text: dict[str, ItemText] = {}  # combine: init — used once, to start the ID table
        spec = self.text_spec
        if spec is None:
            return
        items = [t for t in schema.item_text if t.item in self.plans]
        rows = [t for t in schema.row_text]
        if not items and not rows:
            raise TextConfigError(
                f"model.init_args.text: {schema.source} has no text column this model reads "
                f"(item text of {sorted(self.plans)}, or row-level text)"
            )
        if spec.encoder_dim is None:
            if resources is None or resources.text_encoder(spec.model_path, spec.max_length) is None:
                raise TextConfigError(
                    "model.init_args.text: the encoder's width is unknown; build the model with its dataset's resources"
                )
            encoder = resources.text_encoder(spec.model_path, spec.max_length)
            spec.encoder_dim, spec.encoder_layers = encoder.dim, encoder.num_layers
        for column in items:
            plan = self.plans[column.item]
            dim = spec.dim or plan.width
            if spec.combine == "sum" and dim != plan.width:
                raise TextConfigError(
                    f"model.init_args.text.dim: combine sum needs the {column.item!r} table width "
                    f"{plan.width}, got {dim}"
                )
            if spec.combine == "init" and plan.kind != "plain":
                raise TextConfigError(
                    f"model.init_args.text.combine: init starts a plain item table from the texts; "
                    f"{column.item!r} is {plan.kind!r}"
                )
            if column.item in self.item_text:
                raise TextConfigError(f"{schema.source}: two text columns describe {column.item!r}")
            states = (
                resources.item_text_states(column.name, column.item, spec.model_path, spec.max_length)
                if resources is not None and not resources.serving
                else None
            )
            if spec.combine == "init":  # the texts only start the ID table: nothing of them stays in the model
                if states is not None:
                    self._init_text[column.item] = ItemText(spec, plan.vocab_rows, dim, *states)
                continue
            if resources is not None and resources.serving:
                self.item_text[column.item] = ItemTextTable(column.item, plan.vocab_rows, dim)
            else:
                self.item_text[column.item] = ItemText(spec, plan.vocab_rows, dim, *(states or (None, None)))
            self.text_dims[column.item] = 0 if spec.combine == "sum" else dim
        for column in rows:
            encoder = resources.text_encoder(spec.model_path, spec.max_length) if resources is not None else None
            self.row_text[column.name] = RowText(spec, spec.dim or self.spec.dim, encoder)

    def _build_lookups(self) -> None:
        self.lookups: dict[str, list[Lookup]] = {}
        for f in self.id_features:
            plan = self.plans[self.owner[f]]
            probes = []
            for i in range(plan.probes):
                if plan.hash_rows is not None:
                    transform = Transform("hash", feature_salt(plan.owner, i), plan.hash_rows)
                elif plan.kind == "optembed" and self.spec.stage == "compact":
                    transform = Transform("remap")
                elif plan.kind == "managed":
                    transform = Transform("managed")
                else:
                    transform = Transform("identity")
                key = f"{f}@{i}" if plan.kind in ("hashed", "unified") else f
                probes.append(
                    Lookup(key, f, plan.owner, i, _table_name(plan, i, self.spec.num_tables), plan.dim, transform)
                )
            self.lookups[f] = probes
        self.all_lookups = [lookup for probes in self.lookups.values() for lookup in probes]

    def _needs_rows(self, owner: str) -> bool:
        """Pooled by recsys from looked-up rows (an EmbeddingCollection) rather than by FBGEMM."""
        return (
            self.plans[owner].kind == "optembed"
            or owner in self.item_text
            or any(self.owner[f] == owner for f in self.jagged_features)
        )

    def _build_tables(self) -> None:
        tables: dict[str, dict] = {}
        for lookup in self.all_lookups:
            plan = self.plans[lookup.owner]
            table = tables.setdefault(lookup.table, {"rows": plan.rows, "dim": plan.dim, "keys": [], "by_rows": False})
            table["keys"].append(lookup.key)
            table["by_rows"] |= self._needs_rows(lookup.owner)
        # a feature reads all its probes one way: a shared table read row by row takes its other readers along
        changed = True
        while changed:
            changed = False
            for probes in self.lookups.values():
                if any(tables[p.table]["by_rows"] for p in probes) and not all(
                    tables[p.table]["by_rows"] for p in probes
                ):
                    for p in probes:
                        tables[p.table]["by_rows"] = True
                    changed = True
        self.on_bags = {f: not tables[probes[0].table]["by_rows"] for f, probes in self.lookups.items()}
        bags = [
            EmbeddingBagConfig(
                name=name,
                embedding_dim=t["dim"],
                num_embeddings=t["rows"],
                feature_names=t["keys"],
                pooling=TORCHREC_POOLING[self.pooling],
            )
            for name, t in tables.items()
            if not t["by_rows"]
        ]
        self.bags = EmbeddingBagCollection(tables=bags, device=table_device()) if bags else None
        self.bag_keys = [k for c in bags for k in c.feature_names]
        by_width: dict[int, list[EmbeddingConfig]] = {}
        for name, t in tables.items():
            if t["by_rows"]:  # an EmbeddingCollection needs one width for all its tables
                by_width.setdefault(t["dim"], []).append(
                    EmbeddingConfig(
                        name=name, embedding_dim=t["dim"], num_embeddings=t["rows"], feature_names=t["keys"]
                    )
                )
        self.rows = nn.ModuleDict(
            {f"d{d}": EmbeddingCollection(tables=c, device=table_device()) for d, c in by_width.items()}
        )
        self.row_keys = {
            group: [k for c in configs for k in c.feature_names]
            for group, configs in zip(self.rows, by_width.values(), strict=True)
        }
        self.table_rows = {name: t["rows"] for name, t in tables.items()}
        self.row_table = {key: name for name, t in tables.items() if t["by_rows"] for key in t["keys"]}

    def _build_optembed(self, resources) -> None:  # noqa: ANN001
        optembed = [o for o, p in self.plans.items() if p.kind == "optembed"]
        self.compact = optembed if self.spec.stage == "compact" else []
        self.remaps = nn.Module()  # compact: vocabulary row -> kept row (0: pruned)
        for o in self.compact:
            remap = (
                compact_remap(self._kept[o])
                if self._kept is not None
                else torch.zeros(self.plans[o].vocab_rows, dtype=torch.int64)
            )
            self.remaps.register_buffer(o, remap)
            if table_device() is None:  # row 0, what pruned ids read, is stored as zeros (export readers rely on it)
                with torch.no_grad():
                    self.table_weight(f"t_{o}")[0].zero_()
        spec = self.spec
        self.optembed = (
            Supernet(
                optembed,
                [self.plans[o].dim for o in optembed],
                spec.alpha,
                spec.threshold_init,
                spec.threshold_lr,
                spec.prune_rows,
                spec.sample_dims,
            )
            if optembed and spec.stage == "supernet"
            else None
        )
        if table_device() is None:
            for owner, module in self._init_text.items():
                weight = self.table_weight(f"t_{owner}")
                with torch.no_grad():
                    weight.copy_(module.initial_rows(float(weight.std())))
        self._init_text = {}

    def _build_managed(self) -> None:
        """One ``ManagedIds`` per managed table; evicted rows are re-initialised by ``_reset_evicted``."""
        self.managed = nn.ModuleDict(
            {o: ManagedIds(o, **self.spec.managed(o)) for o, p in self.plans.items() if p.kind == "managed"}
        )
        # what evicted rows are drawn from, and where each table lives (kept: the collections may be sharded)
        configs = list(self.bags.embedding_bag_configs()) if self.bags is not None else []
        by_rows = {g: c.embedding_configs() for g, c in self.rows.items()}
        self.bag_tables = {c.name for c in configs}
        self.row_tables = {g: {c.name for c in cs} for g, cs in by_rows.items()}
        self._init_bounds = {
            c.name: (c.get_weight_init_min(), c.get_weight_init_max(), c.embedding_dim)
            for c in [*configs, *(c for cs in by_rows.values() for c in cs)]
        }
        self.reset_rows: dict[str, Tensor] = {}  # table -> rows re-initialised since the last optimizer step

    def _managed_ids(self, features: dict[str, JaggedTensor]) -> dict[str, JaggedTensor]:
        """Raw ids → slots for every managed table (all its readers in one call: one step of its
        statistics), re-initialising the rows of the slots it just handed to new ids."""
        out: dict[str, JaggedTensor] = {}
        for owner, module in self.managed.items():
            readers = {lk.key: features.get(lk.feature) for lk in self.all_lookups if lk.owner == owner}
            readers = {k: v for k, v in readers.items() if v is not None}
            if not readers:
                continue
            out |= module(readers)
            evicted = module.take_evicted()
            if evicted is not None:
                self._reset_evicted(f"m_{owner}", evicted, int(module.step))
        return out

    @torch.no_grad()
    def _reset_evicted(self, table: str, rows: Tensor, step: int) -> None:
        """A new id gets a freshly initialised row (the table's own initializer), never the evicted id's;
        the optimizer's state of those rows is cleared before the next step (``reset_optimizer_rows``), or
        at once for a sharded table (its fused optimizer updates inside this step's backward). The draw is
        seeded by table and step, so a resumed run, and every rank, draws the same rows."""
        low, high, dim = self._init_bounds[table]
        generator = torch.Generator().manual_seed(feature_salt(table, step))
        fresh = torch.rand(len(rows), dim, generator=generator) * (high - low) + low
        collection, key = self._collection_of(table)
        if isinstance(collection, EmbeddingBagCollection | EmbeddingCollection):  # one process
            weight = self.table_weight(table)
            weight[rows.to(weight.device)] = fresh.to(weight.device, weight.dtype)
            pending = self.reset_rows.get(table)
            self.reset_rows[table] = rows if pending is None else torch.unique(torch.cat([pending, rows]))
            return
        # sharded by DistributedModelParallel: this rank writes the rows of its shards, and zeroes their
        # rows in the fused optimizer's state (what FBGEMM's reset_weight_momentum does, which has no CPU kernel)
        weight_shards = collection.state_dict()[key].local_shards()
        for shard in weight_shards:
            (start, column), (count, width) = shard.metadata.shard_offsets, shard.tensor.shape
            here, drawn = rows.to(shard.tensor.device), fresh.to(shard.tensor.device, shard.tensor.dtype)
            mine = (here >= start) & (here < start + count)
            shard.tensor[here[mine] - start] = drawn[mine][:, column : column + width]
        optimizer = getattr(collection, "fused_optimizer", None)
        for state in optimizer.state.values() if optimizer is not None else []:
            for name, value in state.items():
                if not (name.startswith(f"{table}.") and hasattr(value, "local_shards")):
                    continue
                # a state shard goes with the weight shard of the same local position (whole rows:
                # MANAGED_SHARDING); one that is not one value (or row) per row is not a row's state
                for weight, held in zip(weight_shards, value.local_shards(), strict=False):
                    start, count = weight.metadata.shard_offsets[0], weight.tensor.shape[0]
                    if held.tensor.shape[0] != count:
                        continue
                    here = rows.to(held.tensor.device)
                    held.tensor[here[(here >= start) & (here < start + count)] - start] = 0

    @property
    def sharded(self) -> bool:
        """Whether ``DistributedModelParallel`` has sharded this layer's collections."""
        collections = [c for c in (self.bags, *self.rows.values()) if c is not None]
        return any(not isinstance(c, EmbeddingBagCollection | EmbeddingCollection) for c in collections)

    def _collection_of(self, table: str) -> tuple[nn.Module, str]:
        """The (possibly sharded) collection holding ``table`` and the table's weight key in its state dict."""
        if table in self.bag_tables:
            return self.bags, f"embedding_bags.{table}.weight"
        group = next(g for g, names in self.row_tables.items() if table in names)
        return self.rows[group], f"embeddings.{table}.weight"

    @torch.no_grad()
    def reset_optimizer_rows(self, optimizer: torch.optim.Optimizer) -> None:
        """Zeroes, in every optimizer state tensor shaped like a table (Adam's moments, Adagrad's sums,
        SGD's momentum), the rows re-initialised for new ids since the last step."""
        for table, rows in self.reset_rows.items():
            weight = self.table_weight(table)
            for value in optimizer.state.get(weight, {}).values():
                if isinstance(value, Tensor) and value.shape == weight.shape:
                    value[rows] = 0
        self.reset_rows = {}

    def training_only_state(self) -> tuple[str, ...]:
        """State-dict key prefixes (under this layer) only training reads: MBA's counts, managed tables'
        pending ids and interval history (an export serves the slots as they are)."""
        return ("inverse_counts.", *(f"managed.{o}._extra_state" for o in self.managed))

    def managed_statistics(self) -> dict[str, float]:
        """``managed/<table>/<occupancy|admissions|evictions|pending>``, for TensorBoard and ``recsys``."""
        return {f"managed/{o}/{k}": v for o, m in self.managed.items() for k, v in m.statistics().items()}

    def _build_counts(self, resources) -> None:  # noqa: ANN001
        """Per table row, its train occurrences mapped through the transforms (MBA's ``n_j``)."""
        self.inverse_counts = nn.Module()
        counts: dict[str, Tensor] = {}
        remaps = self._remaps()
        for lookup in self.all_lookups:
            if lookup.feature != lookup.owner:
                continue  # a sequence's ids are its target's: counted once, through the target
            vocab = resources.train_counts(lookup.owner) if resources is not None else None
            rows = self.table_rows[lookup.table]
            if vocab is None or lookup.transform.kind == "managed":  # a slot's id changes: no static count
                counts.setdefault(lookup.table, torch.ones(rows))
                continue
            mapped = table_counts(torch.as_tensor(vocab), lookup.transform, remaps.get(lookup.owner), rows)
            counts[lookup.table] = counts.get(lookup.table, torch.zeros(rows)) + mapped
        for table, count in counts.items():
            self.inverse_counts.register_buffer(table, inverse_counts(count))

    # -- introspection -------------------------------------------------------------------------------
    def output_dims(self) -> dict[str, int]:
        """``{feature: W_f}`` of every output (id features, then row-level text)."""
        dims = {f: self.plans[o].width + self.text_dims.get(o, 0) for f, o in self.owner.items()}
        return dims | {f: m.dim for f, m in self.row_text.items()}

    def table_weight(self, table: str) -> Tensor:
        """The (unsharded) weight of a torchrec table of this layer."""
        if self.bags is not None and table in self.bags.embedding_bags:
            return self.bags.embedding_bags[table].weight
        for collection in self.rows.values():
            if table in collection.embeddings:
                return collection.embeddings[table].weight
        raise KeyError(f"no table {table!r} (tables: {sorted(self.table_rows)})")

    def _remaps(self) -> dict[str, Tensor]:
        return {o: getattr(self.remaps, o) for o in self.compact}

    # -- forward -------------------------------------------------------------------------------------
    def forward(self, batch: Batch) -> Embedded:
        features = batch.sparse.to_dict() | (batch.sequences.to_dict() if batch.sequences.keys() else {})
        return self.embed(features, len(batch), batch.positions, batch.text)

    def embed(
        self,
        features: dict[str, JaggedTensor],
        batch_size: int,
        positions: Tensor | None = None,
        texts: dict[str, list[str]] | None = None,
        remember: bool = True,
    ) -> Embedded:
        """Embeds ``{feature: ids}`` (vocabulary rows); features left out read nothing. ``remember``: these
        are the batch's rows for MBA (a side lookup, ``embed_ids``, is not)."""
        features = {f: features[f] for f in self.id_features if f in features}
        check_ids({f: ids for f, ids in features.items() if f in self.vocab_rows}, self.vocab_rows)
        managed = [lk for lk in self.all_lookups if lk.transform.kind == "managed"]
        rows = transform_ids(features, [lk for lk in self.all_lookups if lk not in managed], self._remaps())
        if managed:
            rows |= self._managed_ids(features)
        looked: dict[str, Tensor] = {}
        if self.bags is not None:
            looked |= self.bags(self._kjt(rows, self.bag_keys, batch_size)).to_dict()
        for group, collection in self.rows.items():
            tables = collection.embeddings if type(collection) is EmbeddingCollection else None
            if tables is not None and all(t.weight.device.type == "cpu" for t in tables.values()):
                # unsharded on CPU: the same rows, read by index_select (nn.Embedding's CPU backward sorts
                # the ids; index_select's is an index_add: 2x faster). On CUDA index_select's backward adds
                # with atomics (not deterministic), so GPUs keep nn.Embedding's
                looked |= {
                    k: tables[self.row_table[k]].weight.index_select(0, rows[k].values())
                    for k in self.row_keys[group]
                    if k in rows
                }
                continue
            out = collection(self._kjt(rows, self.row_keys[group], batch_size))
            looked |= {k: out[k].values() for k in self.row_keys[group]}  # (a sharded output is indexed, not iterated)
        if self.training and torch.is_grad_enabled() and looked:
            self.nonfinite_gradient = False
            keys = list(looked)
            looked = dict(zip(keys, _GradientGuard.apply(self, *(looked[k] for k in keys)), strict=True))
        if self.training and self.mba_lambda > 0 and remember:
            self._remember(features, rows, looked)
        widths = self.optembed.widths(positions, batch_size) if self.optembed is not None else None
        result = Embedded()
        for f, jagged in features.items():
            owner, lookups = self.owner[f], self.lookups[f]
            parts = [looked[lookup.key] for lookup in lookups]
            if self.on_bags[f]:
                result.pooled[f] = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
                continue
            values = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # [N, W_id]
            values = self._mask_rows(owner, values, rows[lookups[0].key].values(), jagged.lengths(), widths)
            if owner in self.item_text:
                text = self.item_text[owner](jagged.values())
                values = values + text if self.text_spec.combine == "sum" else torch.cat([values, text], dim=1)
            if f in self.jagged_features:
                result.jagged[f] = JaggedTensor(values=values, lengths=jagged.lengths())
            else:
                result.pooled[f] = pool_jagged(values, jagged.lengths(), self.pooling)
        if texts is not None:
            for f, module in self.row_text.items():
                result.pooled[f] = module(texts[f])
        return result

    def embed_ids(self, feature: str, ids: Tensor) -> Tensor:
        """``[n]`` vocabulary rows of one feature → ``[n, W]`` (e.g. every item, for retrieval)."""
        lengths = torch.ones_like(ids, dtype=torch.int32)
        out = self.embed({feature: JaggedTensor(values=ids, lengths=lengths)}, len(ids), remember=False)
        return out.pooled[feature] if feature in out.pooled else out.jagged[feature].values()

    def _kjt(self, rows: dict[str, JaggedTensor], keys: list[str], batch_size: int) -> KeyedJaggedTensor:
        """One collection's input: its keys in its order; a feature not embedded now reads nothing."""
        device = next(iter(rows.values())).values().device if rows else None
        empty = None
        values, lengths = [], []
        for key in keys:
            if key in rows:
                values.append(rows[key].values())
                lengths.append(rows[key].lengths().to(torch.int32))
            else:
                empty = empty if empty is not None else torch.zeros(batch_size, dtype=torch.int32, device=device)
                values.append(torch.zeros(0, dtype=torch.int64, device=device))
                lengths.append(empty)
        return KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths), stride=batch_size)

    # -- OptEmbed -------------------------------------------------------------------------------------
    def _mask_rows(self, owner: str, values: Tensor, rows: Tensor, lengths: Tensor, widths: Tensor | None) -> Tensor:
        if owner in self.compact:  # pruned ids read row 0: a zero vector that gets no gradient
            return values * (rows != 0).unsqueeze(1).to(values.dtype)
        if self.optembed is not None and owner in self.optembed.index:
            return self.optembed.mask(owner, values, lengths, widths)
        return values

    def set_eval_dims(self, dims: dict[str, int] | None) -> None:
        """Supernet widths used outside training (None: full); the widths search scores candidates with it."""
        self.optembed.set_eval_dims(dims)

    def narrow(self, embedded: Embedded, dims: dict[str, int]) -> Embedded:
        """``embedded`` (computed at full widths) with supernet table ``o`` cut to its first ``dims[o]``
        columns: exactly the forward under ``set_eval_dims(dims)``, from cached outputs."""
        if not self.narrowable:
            raise ValueError(
                "item text is summed into the OptEmbed rows: the widths cannot be cut from cached "
                "outputs; score with set_eval_dims and a forward instead"
            )
        out = Embedded(dict(embedded.pooled), dict(embedded.jagged))
        for f, owner in self.owner.items():
            if owner not in self.optembed.index:
                continue
            width = self.output_dims()[f]
            tensor = out.pooled[f] if f in out.pooled else out.jagged[f].values()
            keep = torch.ones(width, device=tensor.device, dtype=tensor.dtype)
            keep[int(dims[owner]) : self.plans[owner].width] = 0
            if f in out.pooled:
                out.pooled[f] = out.pooled[f] * keep
            elif f in out.jagged:
                out.jagged[f] = JaggedTensor(values=out.jagged[f].values() * keep, lengths=out.jagged[f].lengths())
        return out

    @property
    def narrowable(self) -> bool:
        """Whether ``narrow`` is exact: not when item text is summed into a supernet table's rows (the
        forward cuts the ID part before the sum, which cached outputs no longer separate)."""
        summed = self.text_spec is not None and self.text_spec.combine == "sum"
        return not (summed and self.optembed is not None and set(self.item_text) & set(self.optembed.index))

    def row_masks(self) -> dict[str, Tensor]:
        """Supernet owner → bool ``[rows]``: the rows its learned threshold keeps (unsharded tables)."""
        return self.optembed.row_masks({o: self.table_weight(f"t_{o}") for o in self.optembed.owners})

    # -- training hooks --------------------------------------------------------------------------------
    def _remember(
        self, features: dict[str, JaggedTensor], rows: dict[str, JaggedTensor], looked: dict[str, Tensor]
    ) -> None:
        """This step's looked-up rows for MBA: every row of a feature kept jagged, and single-id features
        (a pooled list is a mean of rows, whichever collection pools it: not penalised)."""
        terms: dict[str, tuple[list[Tensor], list[Tensor]]] = {}
        for lookup in self.all_lookups:
            if lookup.feature not in features:
                continue
            single = self.schema[lookup.feature].type is FeatureType.CATEGORICAL
            if not single and lookup.feature not in self.jagged_features:
                continue
            table_rows, ids = terms.setdefault(lookup.table, ([], []))
            table_rows.append(looked[lookup.key])
            ids.append(rows[lookup.key].values())
        self._mba_terms = terms

    def regularization(self) -> Tensor | float:
        """MBA over the rows the last training forward looked up, plus OptEmbed's threshold term."""
        terms, self._mba_terms = self._mba_terms, {}
        total: Tensor | float = 0.0
        for table, (table_rows, ids) in terms.items():
            total = total + mba_penalty_from_lookups(
                torch.cat(table_rows), torch.cat(ids), getattr(self.inverse_counts, table), self.mba_lambda
            )
        if self.optembed is not None:
            total = total + self.optembed.regularization()
        return total

    def parameter_groups(self) -> list[dict]:
        """Optimizer groups with their own settings (OptEmbed's thresholds)."""
        return self.optembed.parameter_groups() if self.optembed is not None else []

    def epoch_metrics(self) -> dict[str, float]:
        """Scalars worth logging once per epoch (OptEmbed: share of rows kept, mean threshold)."""
        out = self.managed_statistics()
        if self.optembed is None or not all(isinstance(c, EmbeddingCollection) for c in self.rows.values()):
            return out  # a sharded table's rows live on several ranks
        masks = self.row_masks()
        return out | {
            "optembed/rows_kept": sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values()),
            "optembed/threshold_mean": float(self.optembed.threshold.detach().mean()),
        }

    # -- export --------------------------------------------------------------------------------------
    def describe(self) -> dict:
        """The layer for an export manifest: per feature, its lookups (key, table, transform), masks, text."""
        features = {}
        for f, lookups in self.lookups.items():
            owner = self.owner[f]
            entry = {
                "owner": owner,
                "kind": self.plans[owner].kind,
                "width": self.output_dims()[f],
                "output": "jagged" if f in self.jagged_features else "pooled",
                "lookups": [
                    {"key": lk.key, "table": lk.table, "probe": lk.probe, "transform": _describe(lk)} for lk in lookups
                ],
            }
            if owner in self.compact:
                entry["row_mask"] = "table row 0 is the zero vector of pruned ids"
            if self.optembed is not None and owner in self.optembed.index:
                entry["row_mask"] = (
                    f"rows with L1 norm <= embedding.optembed.threshold[{self.optembed.index[owner]}] read as zeros"
                )
            if owner in self.item_text:
                entry["item_text"] = {
                    "combine": self.text_spec.combine,
                    "table": f"text_{owner}",
                    "by": "the feature's vocabulary row",
                }
            features[f] = entry
        for f, module in self.row_text.items():
            features[f] = {
                "kind": "row_text",
                "width": module.dim,
                "output": "pooled",
                "text": self.text_spec.to_dict(),
                "encoder": "encoder/",
            }
        return {
            "pooling": self.pooling,
            "order": {"pooled": self.pooled_features, "jagged": self.jagged_features},
            "features": features,
        }


class _GradientGuard(torch.autograd.Function):
    """Identity on the lookups' outputs; in backward, if any of their gradients is not finite (on any
    rank), every one is replaced by zeros before it reaches a table: a fused (sharded) table updates
    inside backward, so this is the last point where a NaN can be stopped. SGD, Adagrad and
    row-wise Adagrad leave a row untouched by a zero gradient (FBGEMM's Adam on CUDA would still move
    it through its momentum). The layer's ``nonfinite_gradient`` tells the training step."""

    @staticmethod
    def forward(ctx, layer: EmbeddingLayer, *tensors: Tensor) -> tuple[Tensor, ...]:  # noqa: ANN001
        ctx.layer = layer
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple:  # noqa: ANN001
        present = [g for g in grads if g is not None]
        # one fused reduction per gradient: a norm is not finite when an element is not (or the sum of
        # squares overflows); 10x cheaper than isfinite(g).all(), which takes three passes per tensor
        norms = torch._foreach_norm([g.float() for g in present]) if present else []  # (no copy for fp32)
        finite = bool(torch.isfinite(torch.stack(norms)).all()) if norms else True
        bad = torch.tensor(0 if finite else 1, dtype=torch.int32, device=present[0].device if present else None)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        # or-ed: a step may look rows up more than once (a side lookup); any non-finite one flags the step
        ctx.layer.nonfinite_gradient = ctx.layer.nonfinite_gradient or bool(bad)
        if bool(bad):
            grads = tuple(None if g is None else torch.zeros_like(g) for g in grads)
        return (None, *grads)


def _describe(lookup: Lookup) -> dict:
    t = lookup.transform
    if t.kind == "hash":
        return {"kind": "hash", "hash": "splitmix64", "salt": t.salt, "rows": t.rows}
    if t.kind == "remap":
        return {"kind": "remap", "tensor": f"embedding.remaps.{lookup.owner}"}
    if t.kind == "managed":  # the slot of each id: docs/export_format.md
        return {"kind": "managed", "module": f"embedding.managed.{lookup.owner}"}
    return {"kind": "identity"}
