"""``recsys retrieve``: ID, content and hybrid retrieval with DIN re-ranking, scored by Recall@K / NDCG@K.

    recsys retrieve --two-tower TT.ckpt --din DIN.ckpt --out runs/retrieval     # ml100k-ctr test split

Per user with a click in the evaluated split (docs/protocols.md): the positives are the items clicked
there; every catalogue item the user met in train is excluded from the candidates. The
catalogue is every item of every split and of the dataset's ``items.parquet`` when it has one, so
items absent from train (cold items) are candidates too. Rankings:

- **ID**: the two-tower model's user vector (user id + behavior sequence as of the user's first
  row in the split) against its item vectors (a cold item reads the OOV row), faiss search in a
  ``--index`` of fp32, fp16, int8, product-quantized or binary codes (``recsys.retrieval.index``);
- **text**: content only — each item's text (``--text-feature``) through the local encoder and a
  pooling head (``--pooling``; a trained head can come from a DIN checkpoint with text features,
  ``--text-head``), the user's vector the mean of their train clicks' text vectors;
- **hybrid (RRF)**: reciprocal rank fusion ``Σ 1/(60 + rank)`` of the two lists;
- **hybrid (learned)**: ``α·z(s_id) + (1 − α)·z(s_text)``, each score standardized per user (the two
  cosines live on different scales), ``α`` chosen on the val split (``--cold-floor``: among the α
  that find at least as many cold val positives as content alone); a cold item has no trained ID
  row, so its missing ID score is replaced by its content score (back-off to content). With
  ``--hybrid-tower`` (a two-tower with item text trained with ``item_id_dropout``), ``s_id`` is that
  tower's score, which a cold item has from its text (OOV row ⊕ text): warm items keep it, cold
  items blend it with content by ``α``; the tower alone is reported too (``hybrid_tower``);
- **hybrid + DIN**: the learned hybrid's top ``--rerank-depth`` re-ordered by DIN's click
  probability for (user, candidate), with the user's features and history as of that row.

Writes ``report.json`` and ``report.md`` (overall and cold-item Recall/NDCG) into ``--out``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from recsys.data.arrow import split_files
from recsys.data.encode import ChunkEncoder
from recsys.data.vocab import Vocabulary, check_same_content
from recsys.eval.metrics import ndcg_at_k, recall_at_k, recall_per_user
from recsys.eval.selection import best_on_val
from recsys.retrieval.index import VectorIndex


def _read(data_dir: Path, split: str, columns: list[str]) -> pd.DataFrame:
    import pyarrow.parquet as pq

    return pd.concat(
        [pq.read_table(f, columns=columns).to_pandas() for f in split_files(data_dir, split)], ignore_index=True
    )


class Catalogue:
    """Every item of every split, with its item-level columns (those constant per item in train)."""

    def __init__(
        self, data_dir: Path, vocab: Vocabulary, item: str, text_feature: str, text_with: list[str] | None = None
    ) -> None:
        schema = vocab.schema
        columns = schema.columns()
        frames = {s: _read(data_dir, s, columns) for s in ("train", "val", "test")}
        everything = pd.concat(frames.values(), ignore_index=True)
        listed = data_dir / "items.parquet"  # the whole item file, when the dataset has one (ml100k-cold)
        if listed.exists():
            everything = pd.concat([everything, pd.read_parquet(listed)], ignore_index=True)
        train = frames["train"]
        candidates = [c for c in columns if c not in (item, schema.label)]
        constant = train.groupby(item)[candidates].agg(lambda s: s.map(_hashable).nunique() <= 1).all()
        self.item_columns = [item] + [c for c, ok in constant.items() if ok]
        first = everything.drop_duplicates(item).set_index(item, drop=False)
        self.items = first.index.to_numpy()
        self.values = first[self.item_columns].reset_index(drop=True)
        self.rows = vocab.lookup(item, pa.array(self.items))
        self.cold = self.rows == 0
        self.texts = first[text_feature].fillna("").astype(str).tolist()
        self.plain_texts = self.texts  # the text column alone (what an item table's text rows read)
        for column in text_with or []:  # more item content, e.g. "Heat (1995). genres: Action, Crime, Thriller"
            if column not in self.item_columns:
                raise ValueError(
                    f"--text-with {column!r} is not an item-level column (item columns: {self.item_columns})"
                )
            values = [", ".join(map(str, v)) if isinstance(v, (list, np.ndarray)) else str(v) for v in first[column]]
            self.texts = [f"{t}. {column}: {v}" for t, v in zip(self.texts, values, strict=True)]
        self.position = {v: i for i, v in enumerate(self.items)}
        self.frames = frames


def _hashable(value):  # noqa: ANN001, ANN202
    return tuple(value) if isinstance(value, (list, np.ndarray)) else value


class Queries:
    """Users with a click in ``split``: template row, positives, and train items to exclude."""

    def __init__(self, catalogue: Catalogue, split: str, user: str, item: str, label: str) -> None:
        frame = catalogue.frames[split]
        train = catalogue.frames["train"]
        clicked = frame[frame[label] > 0.5]
        users = clicked[user].unique()
        self.templates = frame[frame[user].isin(users)].drop_duplicates(user).set_index(user).loc[users].reset_index()
        positives = clicked.groupby(user)[item].agg(lambda s: {catalogue.position[i] for i in s})
        seen = train.groupby(user)[item].agg(lambda s: {catalogue.position[i] for i in s})
        self.positives = [positives[u] for u in users]
        self.seen = [seen.get(u, set()) for u in users]
        train_clicks = train[train[label] > 0.5].groupby(user)[item].agg(lambda s: [catalogue.position[i] for i in s])
        self.train_clicks = [train_clicks.get(u, []) for u in users]
        self.users, self.split = users, split
        self.cold_positives = [{p for p in ps if catalogue.cold[p]} for ps in self.positives]
        self.warm_positives = [ps - cold for ps, cold in zip(self.positives, self.cold_positives, strict=True)]


def hybrid_tower_problem(tower, item: str, text_feature: str) -> str | None:  # noqa: ANN001
    """Why ``tower`` cannot be the learned hybrid's ID side over ``item`` with ``text_feature`` (None: it can)."""
    layer = getattr(tower, "embedding", None)
    item_text = layer.item_text[item] if layer is not None and item in layer.item_text else None
    if (
        getattr(tower, "item", None) != item
        or not hasattr(item_text, "pool_states")
        or layer.text_spec.combine != "concat"
        or not getattr(tower, "item_id_dropout", 0)
    ):
        return (
            f"expected a TwoTower over {item!r} with item text combined by concat and trained with "
            "item_id_dropout > 0 (recsys fit --config configs/movielens/two_tower.yaml --config "
            "configs/text/hybrid_tower.yaml); without them a cold item's vector is an untrained row"
        )
    trained_on = [t.name for t in tower.schema.item_text if t.item == item]
    if trained_on != [text_feature]:
        return f"its item text is {trained_on}, not --text-feature {text_feature!r}"
    return None


def _encode(vocab: Vocabulary, frame: pd.DataFrame):  # noqa: ANN202
    schema = vocab.schema
    frame = frame.copy()
    frame[schema.label] = 0
    batch = pa.RecordBatch.from_pandas(frame[[c for c in schema.columns() if c in frame]], preserve_index=False)
    return ChunkEncoder(schema, vocab).encode(batch, Path("<retrieval>"), 0).to_batch()


def _rank(scores: np.ndarray, exclude: list[set], k: int) -> list[list[int]]:
    """Top-k catalogue positions per user of a dense ``[U, N]`` score matrix, excluding seen items."""
    scores = scores.copy()
    for u, seen in enumerate(exclude):
        scores[u, list(seen)] = -np.inf
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[int(i) for i in row if np.isfinite(scores[u, i])] for u, row in enumerate(top)]


def _standardize(scores: np.ndarray) -> np.ndarray:
    """Per-user z-scores of a ``[U, N]`` score matrix."""
    return (scores - scores.mean(1, keepdims=True)) / scores.std(1, keepdims=True).clip(min=1e-8)


def _metrics(ranked: list[list[int]], queries: Queries, ks: list[int]) -> dict[str, float]:
    """``_metrics_at`` for every K of ``ks``, in one dict (keys carry their K)."""
    return {key: value for k in ks for key, value in _metrics_at(ranked, queries, k).items()}


def _metrics_at(ranked: list[list[int]], queries: Queries, k: int) -> dict[str, float]:
    """Recall/NDCG@k overall, Recall@k on cold and on warm positives, and each user's Recall@k (for
    paired bootstraps)."""
    return {
        f"recall@{k}": recall_at_k(ranked, queries.positives, k),
        f"user_recall@{k}": recall_per_user(ranked, queries.positives, k),
        f"ndcg@{k}": ndcg_at_k(ranked, queries.positives, k),
        f"cold_recall@{k}": recall_at_k(ranked, queries.cold_positives, k),
        f"warm_recall@{k}": recall_at_k(ranked, queries.warm_positives, k),
        f"user_cold_recall@{k}": recall_per_user(ranked, queries.cold_positives, k),  # users with a cold positive
        f"user_warm_recall@{k}": recall_per_user(ranked, queries.warm_positives, k),
        "cold_users": int(sum(1 for c in queries.cold_positives if c)),
    }


class Retriever:
    def __init__(
        self,
        two_tower,
        data_dir: Path,
        text_feature: str,
        pooling: str = "mean",  # noqa: ANN001
        text_head: torch.nn.Module | None = None,
        model_path: str | None = None,
        text_with: list[str] | None = None,
        index: str = "fp32",
        binary_rerank: int = 10,
        hybrid_tower=None,  # noqa: ANN001
    ) -> None:
        from recsys.text.encoder import TextEncoder
        from recsys.text.pooling import make_pooling

        self.tt = two_tower.eval()
        self.vocab = Vocabulary.load_or_build(data_dir)
        check_same_content(two_tower.info, self.vocab.info(), data_dir)
        schema = self.vocab.schema
        self.user, self.item, self.label = two_tower.user, two_tower.item, schema.label
        self.catalogue = Catalogue(data_dir, self.vocab, self.item, text_feature, text_with)
        encoder = TextEncoder(model_path)
        states, mask = encoder.encode_cached(self.catalogue.texts, cache_dir=data_dir / "text_cache")
        fixed = make_pooling(pooling, encoder.dim, num_layers=encoder.num_layers) if text_head is None else None
        with torch.no_grad():
            chunks = []
            for start in range(0, states.shape[1], 512):  # bounded memory for big catalogues
                s = states[:, start : start + 512].float()
                m = mask[start : start + 512]
                if text_head is not None:  # a trained ItemText: its projection (head_dim) and head
                    chunks.append(text_head.pool_states(s, m))
                else:
                    chunks.append(fixed(s if pooling == "multilayer" else s[-1], m))
            self.text_items = F.normalize(torch.cat(chunks), dim=1).numpy()
            self.id_items = two_tower.item_vectors(torch.from_numpy(self.catalogue.rows)).numpy()
        self.hybrid = None if hybrid_tower is None else hybrid_tower.eval()
        if self.hybrid is not None:
            self.hybrid_items = self._hybrid_items(text_feature, data_dir)
        self.build_indexes(index, binary_rerank)

    def _hybrid_items(self, text_feature: str, data_dir: Path) -> np.ndarray:
        """``[N, E]`` the hybrid tower's catalogue vectors: each item's ID row (a cold item's: the OOV row)
        ⊕ its ``text_feature`` through the tower's own encoder settings, trained head and projection."""
        from recsys.text.encoder import TextEncoder

        tower = self.hybrid
        problem = hybrid_tower_problem(tower, self.item, text_feature)
        if problem:
            raise ValueError(f"--hybrid-tower: {problem}")
        check_same_content(tower.info, self.vocab.info(), data_dir)
        item_text, spec = tower.embedding.item_text[self.item], tower.embedding.text_spec
        encoder = TextEncoder(spec.model_path, spec.max_length)  # the encoder its text rows were made with
        states, mask = encoder.encode_cached(self.catalogue.plain_texts, cache_dir=data_dir / "text_cache")
        with torch.no_grad():
            vectors = []
            for start in range(0, states.shape[1], 512):
                text = item_text.proj(item_text.pool_states(states[:, start : start + 512], mask[start : start + 512]))
                rows = torch.from_numpy(self.catalogue.rows[start : start + 512])
                vectors.append(tower.item_vectors(rows, text=text))
        return torch.cat(vectors).numpy()

    def build_indexes(self, codec: str = "fp32", binary_rerank: int = 10) -> None:
        """The ID and text item vectors in a ``codec`` index (``recsys.retrieval.index``); binary
        candidates re-ranked by fp32 from the top ``binary_rerank × depth`` (0: Hamming order only)."""
        rerank = binary_rerank if codec == "binary" else 0
        self.index_id = VectorIndex(self.id_items, codec=codec, rerank=rerank)
        self.index_text = VectorIndex(self.text_items, codec=codec, rerank=rerank)

    def user_vectors(self, queries: Queries) -> tuple[np.ndarray, np.ndarray]:
        """``[U, E]`` two-tower user vectors and ``[U, D]`` content user vectors (mean of the user's
        train clicks' text vectors), both L2-normalized."""
        with torch.no_grad():
            ids = self.tt.user_vectors(_encode(self.vocab, queries.templates)).numpy()
        texts = np.stack(
            [
                self.text_items[c].mean(0) if c else np.zeros(self.text_items.shape[1], np.float32)
                for c in queries.train_clicks
            ]
        )
        return ids, texts / np.linalg.norm(texts, axis=1, keepdims=True).clip(min=1e-8)

    def scores(self, queries: Queries) -> tuple[np.ndarray, np.ndarray]:
        """Dense ``[U, N]`` cosine scores: ID (two-tower) and text (content)."""
        users_id, users_text = self.user_vectors(queries)
        return users_id @ self.id_items.T, users_text @ self.text_items.T

    def hybrid_scores(self, queries: Queries, s_id: np.ndarray) -> np.ndarray:
        """``[U, N]`` the learned hybrid's first score: the hybrid tower's when there is one, else ``s_id``."""
        if self.hybrid is None:
            return s_id
        with torch.no_grad():
            users = self.hybrid.user_vectors(_encode(self.vocab, queries.templates)).numpy()
        return users @ self.hybrid_items.T

    def fused(self, s_id: np.ndarray, s_text: np.ndarray, alpha: float) -> np.ndarray:
        """``[U, N]`` fused scores of z-scored ``s_id`` and ``s_text``. Without a hybrid tower:
        ``α·z(s_id) + (1 − α)·z(s_text)``, cold items taking their content z-score as ID score (they have
        no trained ID row). With one (``s_id`` its scores): its z-score for warm items, whose trained
        rows content only adds noise to (val, seed 1: warm Recall@50 0.358 blended at α 0.8 against
        0.380 alone), and ``α·z(s_id) + (1 − α)·z(s_text)`` for cold items, which it places by text alone."""
        z_id, z_text = _standardize(s_id), _standardize(s_text)
        cold = self.catalogue.cold
        if self.hybrid is not None:
            z_id[:, cold] = alpha * z_id[:, cold] + (1 - alpha) * z_text[:, cold]
            return z_id
        z_id[:, cold] = z_text[:, cold]
        return alpha * z_id + (1 - alpha) * z_text

    def alpha(self, val: Queries, k: int, cold_floor: bool = False) -> float:
        """The fusion weight α ∈ {0, 0.1, …, 1} with the best Recall@k on ``val`` (the val split's users).
        ``cold_floor``: among the α whose val Recall@k on cold positives is at least content-only's (α = 0
        ranks as content does, so there is always one) — a hybrid that should not lose cold items."""
        s_id, s_text = self.scores(val)
        s_id = self.hybrid_scores(val, s_id)
        # the floor is α = 0's own ranking (content's scores standardized), so α = 0 always qualifies
        content_cold = recall_at_k(_rank(self.fused(s_id, s_text, 0.0), val.seen, k), val.cold_positives, k)
        candidates = {}
        for a in range(11):
            ranked = _rank(self.fused(s_id, s_text, a / 10), val.seen, k)
            if cold_floor and recall_at_k(ranked, val.cold_positives, k) < content_cold:
                continue
            candidates[a / 10] = {"val": {"recall": recall_at_k(ranked, val.positives, k)}}
        return best_on_val(candidates, "recall")

    def rerank(self, din, queries: Queries, ranked: list[list[int]]) -> list[list[int]]:  # noqa: ANN001
        """Each user's candidates re-ordered by DIN's click probability."""
        out = []
        din.eval()
        for u in tqdm(range(len(ranked)), desc="DIN re-rank", unit="user", leave=False):
            if not ranked[u]:
                out.append([])
                continue
            rows = pd.DataFrame([queries.templates.iloc[u]] * len(ranked[u])).reset_index(drop=True)
            items = self.catalogue.values.iloc[ranked[u]].reset_index(drop=True)
            for column in self.catalogue.item_columns:
                rows[column] = items[column].to_numpy()
            with torch.no_grad():
                probs = torch.sigmoid(din(_encode(self.vocab, rows))).numpy()
            out.append([ranked[u][i] for i in np.argsort(-probs, kind="stable")])
        return out

    def evaluate(
        self,
        din=None,  # noqa: ANN001
        k: int | list[int] = 50,
        rerank_depth: int = 100,
        split: str = "test",
        cold_floor: bool = False,
    ) -> dict:
        """Every ranking's metrics at each K of ``k`` on ``split``; α chosen on val at the largest K
        (``cold_floor``: see ``alpha``)."""
        ks = sorted({k} if isinstance(k, int) else set(k))
        k = ks[-1]
        queries = Queries(self.catalogue, split, self.user, self.item, self.label)
        val = Queries(self.catalogue, "val", self.user, self.item, self.label)
        alpha = self.alpha(val, k, cold_floor)
        users_id, users_text = self.user_vectors(queries)
        s_id, s_text = users_id @ self.id_items.T, users_text @ self.text_items.T
        depth = max(k, rerank_depth)
        ids, _ = self.index_id.search(users_id, depth, queries.seen)
        texts, _ = self.index_text.search(users_text, depth, queries.seen)
        id_ranked = [[int(i) for i in row if i >= 0] for row in ids]
        text_ranked = [[int(i) for i in row if i >= 0] for row in texts]
        fused = []
        for a, b in zip(id_ranked, text_ranked, strict=True):
            score: dict[int, float] = {}
            for ranking in (a, b):
                for r, item in enumerate(ranking):
                    score[item] = score.get(item, 0.0) + 1.0 / (60 + r + 1)
            fused.append(sorted(score, key=lambda i: -score[i])[:depth])
        s_hybrid = self.hybrid_scores(queries, s_id)
        learned = _rank(self.fused(s_hybrid, s_text, alpha), queries.seen, depth)
        results = {
            "id": _metrics(id_ranked, queries, ks),
            "text": _metrics(text_ranked, queries, ks),
            "hybrid_rrf": _metrics(fused, queries, ks),
        }
        if self.hybrid is not None:
            results["hybrid_tower"] = _metrics(_rank(s_hybrid, queries.seen, depth), queries, ks)
        results["hybrid_learned"] = _metrics(learned, queries, ks)
        if din is not None:
            reranked = self.rerank(din, queries, [r[:rerank_depth] for r in learned])
            results["hybrid_learned+din"] = _metrics(reranked, queries, ks)
        return {
            "split": split,
            "k": k,
            "ks": ks,
            "alpha": alpha,
            "alpha_rule": "cold floor" if cold_floor else "best val recall",
            "users": len(queries.users),
            "catalogue": len(self.catalogue.items),
            "cold_items": int(self.catalogue.cold.sum()),
            "rerank_depth": rerank_depth,
            "index": {
                "codec": self.index_id.codec,
                "kind": self.index_id.kind,
                "binary_rerank": self.index_id.rerank,
                "bytes_per_item": {"id": self.index_id.bytes_per_item, "text": self.index_text.bytes_per_item},
            },
            "results": results,
        }


def markdown(report: dict) -> str:
    ks = report.get("ks", [report["k"]])
    columns = [f"{what}@{k}" for k in ks for what in ("Recall", "NDCG", "cold-item Recall", "warm-item Recall")]
    keys = [f"{what}@{k}" for k in ks for what in ("recall", "ndcg", "cold_recall", "warm_recall")]
    lines = [
        f"| retrieval ({report['index']['codec']} index) | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, m in report["results"].items():
        lines.append(f"| {name} | " + " | ".join(f"{m[key]:.4f}" for key in keys) + " |")
    return "\n".join(lines)
