"""DIN: Deep Interest Network (Zhou et al., 2018).

::

    target ids (item_id, genre) ─┐                                      ┌─▶ target embeddings [B, ΣD]
    behavior sequences ──────────┴─▶ EmbeddingCollection (shared tables)┤
      (hist_item_id, hist_genre)        jagged, one row per behavior    └─▶ behaviors [N, ΣD], lengths [B]
                                                                                   │
                             query = target embeddings ──▶ TargetAttention ◀───────┘
                                 a_i = MLP([q, k_i, q−k_i, q⊙k_i]),  interest = Σ a_i k_i   [B, ΣD]
    other ids (user, gender, genres…) ─▶ EmbeddingBagCollection ─▶ pooled [B, Σ D_f]
    numeric features ───────────────────────────────────────────▶ dense [B, n_dense]
                       concat(pooled, targets, interest, dense) ─▶ MLP (Dice) ─▶ logit

Sequences read their target's table (``hist_item_id`` → ``item_id``) through one torchrec
``EmbeddingCollection`` table holding both feature names. Every schema ``sequence`` feature takes
part; sequences listed together in one attention group (default: all of them, which must then
have equal lengths per row) are concatenated per behavior, as the paper does with item and
category. Mini-batch aware regularization (``mba_lambda``) penalises the rows a batch touches.
"""

from __future__ import annotations

import torch
from lightning.pytorch.cli import OptimizerCallable
from torchrec import EmbeddingCollection, EmbeddingConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recsys.data.batch import Batch
from recsys.data.schema import FeatureType
from recsys.data.vocab import DatasetInfo, Vocabulary
from recsys.embedding.regularization import inverse_counts, mba_penalty_from_lookups
from recsys.embedding.tables import (
    IdGuard,
    concat_pooled,
    feature_order,
    pooled_tables_for,
    table_device,
)
from recsys.embedding.unified import UnifiedEmbeddingBag, UnifiedEmbeddingCollection, UnifiedSpec
from recsys.layers.attention import TargetAttention
from recsys.layers.mlp import MLP
from recsys.text.features import ItemText, TextSpec
from recsys.train.module import CTRModule, default_optimizer


class DIN(CTRModule):
    """Deep Interest Network over any dataset whose schema declares ``sequence`` features.

    Args:
        features: dataset info (linked from the data module by the CLI).
        embedding_dim: dimension of every table (the sequence tables must share one).
        attention_hidden_units: widths of the attention MLP.
        attention_activation: ``dice`` (paper), ``prelu``, ``relu``, ``sigmoid``.
        attention_softmax: normalise attention weights per row (the paper does not).
        attention_groups: lists of sequence features that attend together; default all in one.
        dnn_hidden_units, dnn_activation, dnn_dropout: the prediction MLP.
        pooling: pooling of the non-sequence multi-hot features (``sum`` or ``mean``).
        mba_lambda: strength λ of mini-batch aware L2 on the embedding rows a batch uses (0: off);
            computed from the looked-up rows, so it also works on sharded tables. Multi-hot
            pooled features are not penalised (their lookup output is a mean of rows).
        unified: shared tables with per-feature probes (Unified Embedding) for every id feature,
            sequences and targets included (each sequence probes with its target's salts).
        text: item text vectors (a local transformer + a pooling head, ``recsys.text.features.TextSpec``)
            joined to the item's ID embedding for the target and its behaviors (concat, sum or init).
        optimizer: optimizer factory over all parameters.

    Example::

        model = DIN(datamodule.dataset_info, embedding_dim=16, mba_lambda=0.01)
        logits = model(batch)       # [B]
    """

    def __init__(
        self,
        features: DatasetInfo | dict,
        embedding_dim: int = 16,
        attention_hidden_units: list[int] = [36],  # noqa: B006 (the paper's activation unit)
        attention_activation: str = "dice",
        attention_softmax: bool = False,
        attention_groups: list[list[str]] | None = None,
        dnn_hidden_units: list[int] = [200, 80],  # noqa: B006
        dnn_activation: str = "dice",
        dnn_dropout: float = 0.0,
        pooling: str = "mean",
        mba_lambda: float = 0.0,
        unified: UnifiedSpec | None = None,
        text: TextSpec | None = None,
        optimizer: OptimizerCallable = default_optimizer,
    ) -> None:
        super().__init__(features, optimizer)
        unified = UnifiedSpec(**unified) if isinstance(unified, dict) else unified  # from a manifest or DCP checkpoint
        text = TextSpec(**text) if isinstance(text, dict) else text
        sequences = self.schema.sequences
        if not sequences:
            raise ValueError(f"{self.schema.source}: DIN needs at least one 'sequence' feature; use EmbeddingMLP instead")
        self.target_of = {s.name: s.target for s in sequences}
        self.targets = list(dict.fromkeys(self.target_of.values()))  # in schema order, unique
        self.groups = attention_groups or [[s.name for s in sequences]]
        self._check_groups()

        self.pooled_features = [f.name for f in self.schema.sparse if f.name not in self.targets]
        sequence_owners = {t: t for t in self.targets} | self.target_of
        if unified is None:
            dims = {self.schema[t].embedding_dim or embedding_dim for t in self.targets}
            if len(dims) > 1:
                raise ValueError(f"sequence target tables {self.targets} must share one embedding_dim, got {sorted(dims)}")
            dim = dims.pop()
            self.width = dict.fromkeys(sequence_owners, dim)
            self.sequence_tables = EmbeddingCollection(tables=[
                EmbeddingConfig(name=f"t_{t}", embedding_dim=dim, num_embeddings=self.info.num_embeddings[t],
                                feature_names=[t] + [s for s, target in self.target_of.items() if target == t])
                for t in self.targets
            ], device=table_device())
            self.pooled_tables = pooled_tables_for(self.info, self.pooled_features, embedding_dim, pooling)
            self.pooled_order = feature_order(self.pooled_tables) if self.pooled_tables else []
            self.guard = IdGuard.for_tables(self.sequence_tables, *([self.pooled_tables] if self.pooled_tables else []))
            pooled_width = sum(c.embedding_dim for c in self.pooled_tables.embedding_bag_configs()) if self.pooled_tables else 0
        else:  # feature multiplexing: targets, sequences and the other ids probe shared tables
            if mba_lambda > 0:
                raise ValueError("mba_lambda needs per-id train counts; shared (unified) rows have none: set mba_lambda: 0")
            self.sequence_tables = UnifiedEmbeddingCollection(sequence_owners, unified)
            self.width = self.sequence_tables.output_dims()
            pooled_owners = {f: f for f in self.pooled_features}
            self.pooled_tables = UnifiedEmbeddingBag(pooled_owners, unified, pooling) if pooled_owners else None
            self.pooled_order = list(pooled_owners)
            self.guard = IdGuard({f: self.info.num_embeddings[o] for f, o in (sequence_owners | pooled_owners).items()})
            pooled_width = sum(self.pooled_tables.output_dims().values()) if self.pooled_tables else 0
        self.item_text, self.text_features = None, []
        if text is not None:
            self._add_text(text, unified)
        self.attention = torch.nn.ModuleList(
            TargetAttention(sum(self.width[s] for s in group), attention_hidden_units, attention_activation, attention_softmax)
            for group in self.groups
        )
        width = pooled_width + sum(self.width[t] for t in self.targets) + sum(self.width[s] for s in self.target_of)
        width += len(self.schema.numeric)
        self.dnn = MLP(width, dnn_hidden_units, 1, dnn_activation, dnn_dropout)

        self.mba_lambda = mba_lambda
        self.single_valued_pooled = [f for f in self.pooled_features if self.schema[f].type is FeatureType.CATEGORICAL]
        if mba_lambda > 0:
            counts = self._train_counts()
            for table in [*self.targets, *self.single_valued_pooled]:
                self.register_buffer(f"inverse_counts_{table}", inverse_counts(counts[table]))

    def _add_text(self, text: TextSpec, unified: UnifiedSpec | None) -> None:
        """Item text vectors join the item's ID embedding for the target and its behaviors."""
        if unified is not None:
            raise ValueError("text features need per-item table rows; they do not combine with unified tables")
        item = text.item or self.targets[0]
        if item not in self.targets:
            raise ValueError(f"text.item {item!r} must be a sequence target ({self.targets})")
        width = self.width[item]
        dim = text.dim or width
        if text.combine in ("sum", "init") and dim != width:
            raise ValueError(f"text.combine={text.combine} needs text.dim equal to the {item!r} table width {width}")
        self.item_text = ItemText(self.info, text, item, dim)
        self.text_features = [item] + [s for s, t in self.target_of.items() if t == item]
        self.text_combine = text.combine
        if text.combine == "concat":
            for f in self.text_features:
                self.width[f] += dim
        elif text.combine == "init" and table_device() is None:  # (tables on meta: nothing to initialize)
            weight = self.sequence_tables.embeddings[f"t_{item}"].weight
            with torch.no_grad():
                weight.copy_(self.item_text.initial_rows(float(weight.std())))

    def _with_text(self, jagged: dict, sequence_ids: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """Looked-up rows per feature, with the item text vectors joined (concat or sum)."""
        values = {f: jagged[f].values() for f in sequence_ids.keys()}  # (a sharded output cannot be iterated)
        if self.item_text is None or self.text_combine == "init":
            return values
        ids = [sequence_ids[f].values() for f in self.text_features]
        vectors = self.item_text(torch.cat(ids)).split([len(i) for i in ids])
        for f, v in zip(self.text_features, vectors, strict=True):
            values[f] = torch.cat([values[f], v], dim=1) if self.text_combine == "concat" else values[f] + v
        return values

    def _check_groups(self) -> None:
        grouped = [s for group in self.groups for s in group]
        unknown = sorted(set(grouped) - set(self.target_of))
        if unknown or len(grouped) != len(set(grouped)) or set(grouped) != set(self.target_of):
            raise ValueError(
                f"attention_groups must list each sequence feature {sorted(self.target_of)} exactly once, got {self.groups}"
            )

    def _train_counts(self) -> dict[str, torch.Tensor]:
        """Per-row train counts for the MBA penalty; ones when the dataset is not at hand
        (loading a checkpoint elsewhere: the saved buffers replace them)."""
        try:
            vocab = Vocabulary.load_or_build(self.info.path)
            return {t: torch.from_numpy(c) for t, c in vocab.counts.items()}
        except (OSError, ValueError):
            return {t: torch.ones(n, dtype=torch.int64) for t, n in self.info.num_embeddings.items()}

    def _ids(self, batch: Batch) -> tuple[KeyedJaggedTensor, KeyedJaggedTensor | None]:
        """(ids read through the sequence tables: targets + sequences, ids of the pooled tables)."""
        sparse = batch.sparse.to_dict()
        sequence_ids = KeyedJaggedTensor.from_jt_dict({t: sparse[t] for t in self.targets} | batch.sequences.to_dict())
        if not self.pooled_features:
            return sequence_ids, None
        return sequence_ids, KeyedJaggedTensor.from_jt_dict({f: sparse[f] for f in self.pooled_features})

    def forward(self, batch: Batch) -> torch.Tensor:
        sequence_ids, pooled_ids = self._ids(batch)
        jagged = self.sequence_tables(self.guard(sequence_ids))  # feature -> JaggedTensor
        values = self._with_text(jagged, sequence_ids)
        targets = {t: values[t] for t in self.targets}  # [B, D] each: one id per row
        parts = []
        if pooled_ids is not None:
            pooled = self.pooled_tables(self.guard(pooled_ids))
            parts.append(concat_pooled(pooled, self.pooled_order))
        if self.training and self.mba_lambda > 0:
            self._remember_lookups(jagged, pooled if pooled_ids is not None else None, sequence_ids, pooled_ids)
        parts += list(targets.values())
        for attention, group in zip(self.attention, self.groups, strict=True):
            lengths = jagged[group[0]].lengths()
            for s in group[1:]:
                if not torch.equal(jagged[s].lengths(), lengths):
                    raise ValueError(f"sequences {group} attend together but differ in length; set attention_groups")
            query = torch.cat([targets[self.target_of[s]] for s in group], dim=1)  # [B, D·|group|]
            keys = torch.cat([values[s] for s in group], dim=1)  # [N, D·|group|]
            parts.append(attention(query, keys, lengths))
        parts.append(batch.dense)
        return self.dnn(torch.cat(parts, dim=1)).squeeze(-1)

    def _remember_lookups(self, jagged: dict, pooled: KeyedTensor | None, sequence_ids: KeyedJaggedTensor,
                          pooled_ids: KeyedJaggedTensor | None) -> None:
        """Keeps this step's looked-up rows for the MBA penalty: every target and behavior, and the
        single-valued pooled features (a pooled multi-hot row is a mean, not a table row)."""
        terms = []
        for t in self.targets:
            readers = [t] + [s for s, target in self.target_of.items() if target == t]
            terms.append((t, torch.cat([jagged[f].values() for f in readers]), torch.cat([sequence_ids[f].values() for f in readers])))
        if pooled is not None:
            blocks = pooled.to_dict()
            for f in self.single_valued_pooled:
                terms.append((f, blocks[f], pooled_ids[f].values()))
        self._mba_terms = terms

    def regularization(self, batch: Batch) -> torch.Tensor | float:
        """Mini-batch aware L2 over the rows the last training forward looked up."""
        terms, self._mba_terms = getattr(self, "_mba_terms", []), []
        if self.mba_lambda <= 0 or not terms:
            return 0.0
        return sum(
            mba_penalty_from_lookups(rows, ids, getattr(self, f"inverse_counts_{table}"), self.mba_lambda)
            for table, rows, ids in terms
        )
