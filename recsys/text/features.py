"""Text as features of any model: item text joined to the item's embedding, row-level text as a feature.

A schema ``text`` column with ``item: <feature>`` describes that item (ml100k-ctr: ``movie_title``
describes ``item_id``): ``ItemText`` holds one text per row of the item's table (from the train
split; row 0, the OOV row, has the empty text) as token states encoded once by a local
transformer, and turns item rows into vectors (a pooling head, ``recsys.text.pooling``, then a
linear projection). Targets and behavior sequences read the same rows, so attention sees text
too. A text column without ``item:`` is row-level: ``RowText`` encodes each distinct text of a
batch once (frozen encoder, states cached in memory) and pools it the same way.

The ``text`` block (under ``model.init_args``) applies to every text column of the dataset::

    text: {pooling: mean, dim: 8, combine: concat}      # combine (item text): concat | sum | init

The token states come from ``resources`` (``recsys.data.resources``), never from a file the model
opens; they are buffers, so a checkpoint rebuilds the model. An export stores the item vectors as
one more table (``ItemTextTable``) and the encoder's files for row-level text.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchrec import EmbeddingCollection, EmbeddingConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.embedding.tables import table_device
from recsys.text.pooling import HEADS, make_pooling, masked_mean

COMBINES = ("concat", "sum", "init")
FIXED_HEADS = ("mean", "cls", "last", "max")  # no parameters: pool every text once
WHERE = "model.init_args.text"


class TextConfigError(ValueError):
    """The ``text`` block is invalid; the message names the key."""


@dataclass
class TextSpec:
    """The ``text`` block.

    Attributes:
        pooling: pooling head over the token states (``recsys.text.pooling.HEADS``).
        dim: width of the projected text vector (a multiple of 4); default: the item table's width
            for item text, ``embedding.dim`` for row-level text.
        combine: item text: ``concat`` (ID ⊕ text), ``sum`` (ID + text, ``dim`` = the table width), or
            ``init`` (a plain item table starts from the texts' principal components, then trains as IDs).
        model_path: local transformer directory (default: all-MiniLM-L6-v2 from its wheel).
        max_length: tokens kept per text.
        head_dim: item text with a trainable head: the cached token states are projected once, when
            the model is built, onto their top ``head_dim`` principal components (of the item texts'
            real tokens), and the head works at that width (``configs/text/latent.yaml``: 64 — the
            latent head's per-token attention and MLP scale with the width squared). Default: the
            encoder's width. Row-level text always pools at the encoder's width.
        encoder_dim, encoder_layers: the encoder's width and hidden states per text, filled from the
            encoder when the model is built with its dataset (so a checkpoint rebuilds without it).
    """

    pooling: str = "mean"
    dim: int | None = None
    combine: str = "concat"
    model_path: str | None = None
    max_length: int = 32
    head_dim: int | None = None
    encoder_dim: int | None = None
    encoder_layers: int | None = None

    @classmethod
    def parse(cls, block: dict | TextSpec | None) -> TextSpec | None:
        if block is None or isinstance(block, TextSpec):
            return block
        if not isinstance(block, dict):
            raise TextConfigError(f"{WHERE}: expected a mapping, got {block!r}")
        if "feature" in block or "item" in block:
            raise TextConfigError(
                f"{WHERE}.{'feature' if 'feature' in block else 'item'}: the text block names no "
                f"column; it applies to every text column of the dataset, and schema.yaml links "
                f"item text with `item: <feature>` on the text column"
            )
        unknown = sorted(set(block) - set(cls.__dataclass_fields__))
        if unknown:
            raise TextConfigError(f"{WHERE}.{unknown[0]}: unknown key (known: {sorted(cls.__dataclass_fields__)})")
        whole = ("dim", "max_length", "head_dim", "encoder_dim", "encoder_layers")
        block = {  # a command-line override (--model.init_args.text.dim 16) arrives as a string
            k: int(v) if k in whole and isinstance(v, str) and v.strip().isdecimal() else v for k, v in block.items()
        }
        spec = cls(**block)
        if spec.pooling not in HEADS:
            raise TextConfigError(f"{WHERE}.pooling: one of {list(HEADS)}, got {spec.pooling!r}")
        if spec.combine not in COMBINES:
            raise TextConfigError(f"{WHERE}.combine: one of {list(COMBINES)}, got {spec.combine!r}")
        if spec.dim is not None and (not isinstance(spec.dim, int) or spec.dim < 4 or spec.dim % 4):
            raise TextConfigError(
                f"{WHERE}.dim: a positive multiple of 4 (item text exports as a table), got {spec.dim!r}"
            )
        if spec.head_dim is not None and (not isinstance(spec.head_dim, int) or spec.head_dim < 4 or spec.head_dim % 4):
            raise TextConfigError(
                f"{WHERE}.head_dim: a positive multiple of 4 (the heads' widths), got {spec.head_dim!r}"
            )
        if spec.head_dim is not None and spec.pooling in FIXED_HEADS:
            raise TextConfigError(
                f"{WHERE}.head_dim: the {spec.pooling!r} head has no parameters (every text is pooled once); "
                "head_dim is for trainable heads"
            )
        if spec.head_dim is not None and spec.pooling == "gem":
            raise TextConfigError(
                f"{WHERE}.head_dim: GeM pools positive values (it clamps at eps) and principal components are "
                "signed; GeM keeps the encoder's width"
            )
        return spec

    @property
    def layers(self) -> int:
        """Hidden states a head reads: all of them for ``multilayer``, else the last."""
        return int(self.encoder_layers) if self.pooling == "multilayer" else 1

    def head(self, width: int) -> nn.Module:
        """The pooling head at ``width`` (the encoder's, or ``head_dim`` for item text)."""
        return make_pooling(
            self.pooling,
            width,
            num_layers=self.encoder_layers,
            **({"num_latents": 16} if self.pooling == "latent" else {}),
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


LENGTH_BUCKETS = (4, 8, 16)  # a batch's texts are pooled in groups of similar length, each cut to its longest


def _principal_components(states: Tensor, mask: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Mean ``[D]`` and top ``width`` principal directions ``[D, width]`` of the real tokens of the
    last layer of ``states`` ``[L, N, T, D]``."""
    tokens = states[-1][mask.bool()].float()
    if len(tokens) < width:
        raise TextConfigError(
            f"{WHERE}.head_dim: {width} needs at least as many tokens; the item texts have {len(tokens)}"
        )
    mean = tokens.mean(0)
    _, _, v = torch.linalg.svd(tokens - mean, full_matrices=False)
    return mean, v[:width].T


def _pad(states: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """States ``[L, N, T, D]`` and mask ``[N, T]`` cut or zero-padded to ``T = length``."""
    states, mask = states[:, :, :length], mask[:, :length]
    pad = length - states.shape[2]
    if pad:
        states = nn.functional.pad(states, (0, 0, 0, pad))
        mask = nn.functional.pad(mask, (0, pad))
    return states, mask


class ItemText(nn.Module):
    """Item table rows → text vectors ``[n, dim]`` (training form).

    Args:
        spec: the text block (encoder sizes filled in).
        rows: rows of the item's table.
        dim: projected width.
        states, mask: ``[L, rows, T, D]`` token states and ``[rows, T]`` mask of every row's text
            (from ``resources``); omit when a state dict follows (a checkpoint).
    """

    def __init__(
        self, spec: TextSpec, rows: int, dim: int, states: Tensor | None = None, mask: Tensor | None = None
    ) -> None:
        super().__init__()
        self.spec, self.rows, self.dim = spec, rows, dim
        self.fixed = spec.pooling in FIXED_HEADS
        width, length = spec.head_dim or int(spec.encoder_dim), spec.max_length
        self.head = spec.head(width)
        self.proj = nn.Linear(width, dim)
        if states is not None:
            states, mask = _pad(states[-spec.layers :], mask, length)
        encoder_width = int(spec.encoder_dim)
        projection = (torch.zeros(encoder_width), torch.zeros(encoder_width, width))
        if states is not None and width != encoder_width:  # onto the item tokens' principal components, once
            projection = _principal_components(states, mask, width)
        if width != encoder_width:  # kept so that other texts (retrieval's catalogue) are projected alike
            self.register_buffer("token_mean", projection[0])  # [D]
            self.register_buffer("token_directions", projection[1])  # [D, head_dim]
            if states is not None:
                states = self._project(states)
        if self.fixed:  # a parameter-free head: pool every row once
            pooled = torch.zeros(rows, width)
            if states is not None:
                with torch.no_grad():
                    pooled = self._head(states.float(), mask)
            self.register_buffer("pooled", pooled)  # [rows, D]
        elif spec.pooling == "multilayer":  # its per-layer means have no parameters: take them once
            means = torch.zeros(spec.layers, rows, width)
            if states is not None:
                means = masked_mean(states.float(), mask)
            self.register_buffer("layer_means", means)  # [L, rows, D]
        else:  # token states (GeM: their logs, see GeMPooling.from_logs), fp16
            if states is not None and spec.pooling == "gem":
                states = states.float().clamp(min=self.head.eps).log()
            self.register_buffer(
                "log_states" if spec.pooling == "gem" else "states",
                states.half()
                if states is not None
                else torch.zeros(spec.layers, rows, length, width, dtype=torch.float16),
            )
            self.register_buffer(
                "mask", mask.long() if mask is not None else torch.ones(rows, length, dtype=torch.long)
            )

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:  # noqa: ANN401
        """Checkpoints written before GeM cached logs and multilayer cached layer means held the token
        states: derive what this version keeps from them."""
        old, mask = state_dict.get(prefix + "states"), state_dict.get(prefix + "mask")
        if old is not None and self.spec.pooling == "gem":
            state_dict[prefix + "log_states"] = old.float().clamp(min=self.head.eps).log().half()
            del state_dict[prefix + "states"]
        elif old is not None and self.spec.pooling == "multilayer":
            state_dict[prefix + "layer_means"] = masked_mean(old.float(), mask)
            del state_dict[prefix + "states"], state_dict[prefix + "mask"]
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _head(self, states: Tensor, mask: Tensor) -> Tensor:
        return self.head(states if states.shape[0] > 1 else states[0], mask)

    def pool_states(self, states: Tensor, mask: Tensor) -> Tensor:
        """``[n, width]`` for any texts' encoder states ``[L, n, T, D]`` (all layers the encoder gives) and
        mask ``[n, T]``: the projection (``head_dim``) and the head, as this module's rows are pooled."""
        return self._head(self._project(states[-self.spec.layers :]), mask)

    def _project(self, states: Tensor) -> Tensor:
        """``[..., D]`` → ``[..., head_dim]`` on the item tokens' principal components (float as is
        without ``head_dim``)."""
        states = states.float()
        if hasattr(self, "token_directions"):
            states = (states - self.token_mean) @ self.token_directions
        return states

    def _pooled(self, rows: Tensor) -> Tensor:
        """``[n, width]``: the trainable head over distinct ``rows``, texts grouped by length (each group
        cut to its longest text: the heads ignore padding, so this only skips work); the latent head
        attends token by token, so its texts need no groups."""
        if self.spec.pooling == "multilayer":
            return self.head.attend(self.layer_means[:, rows].transpose(0, 1))
        if self.spec.pooling == "latent":  # each token attends alone: the real tokens only, no padding, no groups
            text, position = self.mask[rows].bool().nonzero(as_tuple=True)  # [n] each, text by text
            return self.head.pool_tokens(self.states[-1, rows[text], position].float(), text, len(rows))
        lengths = self.mask[rows].sum(1)
        groups, outputs = [], []
        for low, high in zip((-1, *LENGTH_BUCKETS), (*LENGTH_BUCKETS, self.mask.shape[1]), strict=True):
            group = ((lengths > low) & (lengths <= high)).nonzero().squeeze(1)
            if len(group):
                cut, chosen = int(lengths[group].max()), rows[group]
                mask = self.mask[chosen, :cut]
                if self.spec.pooling == "gem":
                    outputs.append(self.head.from_logs(self.log_states[-1, chosen, :cut].float(), mask))
                else:
                    outputs.append(self._head(self.states[:, chosen, :cut].float(), mask))
                groups.append(group)
        return torch.cat(outputs)[torch.argsort(torch.cat(groups))]

    def forward(self, rows: Tensor) -> Tensor:
        """``[*rows.shape, dim]``; each distinct row is pooled and projected once (a DIN batch reads
        ~50,000 behavior rows of ~1,500 items: with mean pooling, gathering and projecting 384-wide
        vectors per read took 33 of an 83 ms training step)."""
        unique, inverse = torch.unique(rows, return_inverse=True)
        pooled = self.pooled[unique] if self.fixed else self._pooled(unique)
        return self.proj(pooled)[inverse]

    @torch.no_grad()
    def all_vectors(self, chunk: int = 4096) -> Tensor:
        """``[rows, dim]``: every row's vector (what an export stores as a table)."""
        return torch.cat([self(torch.arange(s, min(s + chunk, self.rows))) for s in range(0, self.rows, chunk)])

    @torch.no_grad()
    def initial_rows(self, std: float) -> Tensor:
        """``[rows, dim]`` start values for an ID table (``combine: init``): the pooled texts on their top
        principal components, scaled to ``std``."""
        vectors = self.pooled if self.fixed else self._pooled(torch.arange(self.rows))
        centered = vectors - vectors.mean(0)
        _, _, v = torch.linalg.svd(centered, full_matrices=False)
        if v.shape[0] < self.dim:
            raise TextConfigError(f"{WHERE}.combine: init needs at least {self.dim} distinct texts")
        projected = centered @ v[: self.dim].T
        return projected / projected.std().clamp(min=1e-8) * std


class ItemTextTable(nn.Module):
    """Item table rows → text vectors, looked up in a table (the serving form: an export stores
    ``ItemText.all_vectors()`` as this table, so fp16/int8 apply to it like any other)."""

    def __init__(self, item: str, rows: int, dim: int) -> None:
        super().__init__()
        self.key = f"{item}#text"
        self.table = EmbeddingCollection(
            tables=[
                EmbeddingConfig(name=f"text_{item}", embedding_dim=dim, num_embeddings=rows, feature_names=[self.key])
            ],
            device=table_device(),
        )

    def forward(self, rows: Tensor) -> Tensor:
        kjt = KeyedJaggedTensor(keys=[self.key], values=rows, lengths=torch.ones_like(rows, dtype=torch.int32))
        return self.table(kjt)[self.key].values()


class RowText(nn.Module):
    """Row-level texts ``[B]`` → vectors ``[B, dim]``: the frozen encoder runs once per distinct text
    (its states are cached here, in memory), then the head and the projection.

    Args:
        spec: the text block (encoder sizes filled in).
        dim: projected width.
        encoder: a callable ``texts → (states [L, n, T, D], mask [n, T])`` (``TextEncoder``); given by
            the resources at build time (training) or by the export loader (serving).
        cache_bytes: the most the cache of encoded texts may hold (it is emptied beyond).
    """

    def __init__(self, spec: TextSpec, dim: int, encoder: Any = None, cache_bytes: int = 256 << 20) -> None:
        super().__init__()
        self.spec, self.dim, self.cache_bytes = spec, dim, cache_bytes
        self._held = 0  # bytes the cache holds: bounded, whatever texts arrive (a server sees any)
        self.head = spec.head(int(spec.encoder_dim))
        self.proj = nn.Linear(int(spec.encoder_dim), dim)
        self.fixed = spec.pooling in FIXED_HEADS
        self.__dict__["encoder"] = encoder  # not a submodule: its weights are not this model's state
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}

    def _encode(self, texts: list[str]) -> None:
        if self.encoder is None:
            raise RuntimeError(
                "row-level text needs its text encoder: build the model with its dataset's resources "
                "(or load an export, which carries the encoder)"
            )
        for start in range(0, len(texts), 256):
            part = texts[start : start + 256]
            with torch.inference_mode():
                states, mask = self.encoder(part)
            states = states[-self.spec.layers :].float().clone()
            for i, text in enumerate(part):
                length = int(mask[i].sum())
                one = states[:, i : i + 1, :length]
                entry = (
                    self._head(one, torch.ones(1, length, dtype=torch.long))[0] if self.fixed else one.half(),
                    torch.ones(length, dtype=torch.long),
                )
                self._cache[text] = entry
                self._held += entry[0].numel() * entry[0].element_size() + len(text)

    def _head(self, states: Tensor, mask: Tensor) -> Tensor:
        return self.head(states if states.shape[0] > 1 else states[0], mask)

    def forward(self, texts: list[str]) -> Tensor:
        unique, inverse = np.unique(np.asarray(texts, dtype=object).astype(str), return_inverse=True)
        unique = [str(t) for t in unique]
        if self._held > self.cache_bytes:  # (before this batch's lookups, so none of its texts goes missing)
            self._cache.clear()
            self._held = 0
        missing = [t for t in unique if t not in self._cache]
        if missing:
            self._encode(missing)
        device = self.proj.weight.device
        if self.fixed:
            pooled = torch.stack([self._cache[t][0] for t in unique]).to(device)
        else:
            length = max(self._cache[t][0].shape[2] for t in unique)
            states = torch.cat(
                [
                    nn.functional.pad(self._cache[t][0].float(), (0, 0, 0, length - self._cache[t][0].shape[2]))
                    for t in unique
                ],
                dim=1,
            ).to(device)
            mask = torch.stack(
                [nn.functional.pad(self._cache[t][1], (0, length - len(self._cache[t][1]))) for t in unique]
            )
            pooled = self._head(states, mask.to(device))
        return self.proj(pooled)[torch.as_tensor(inverse, device=device)]
