"""Nearest-neighbour search over item vectors (faiss, inner product on normalized vectors).

``VectorIndex(vectors, ids)`` picks the index by catalogue size: exact (``IndexFlatIP``) up to
``exact_limit`` items, HNSW above it (``kind="hnsw"``), or IVF (``kind="ivf"``). ``search``
can exclude, per query, ids the user has already seen (docs/protocols.md: items seen in train are
not candidates).
"""

from __future__ import annotations

import math

import faiss
import numpy as np


class VectorIndex:
    def __init__(
        self,
        vectors: np.ndarray,
        ids: np.ndarray | None = None,
        kind: str = "auto",
        exact_limit: int = 100_000,
        hnsw_m: int = 32,
        ef_search: int = 128,
        nprobe: int = 16,
    ) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) == 0:
            raise ValueError(f"vectors must be a non-empty [N, E] array, got shape {vectors.shape}")
        self.ids = np.arange(len(vectors)) if ids is None else np.asarray(ids)
        if len(self.ids) != len(vectors):
            raise ValueError(f"{len(self.ids)} ids for {len(vectors)} vectors")
        dim = vectors.shape[1]
        self.kind = ("exact" if len(vectors) <= exact_limit else "hnsw") if kind == "auto" else kind
        if self.kind == "exact":
            self.index = faiss.IndexFlatIP(dim)
        elif self.kind == "hnsw":
            self.index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efSearch = ef_search
        elif self.kind == "ivf":
            nlist = max(1, int(4 * math.sqrt(len(vectors))))
            self.index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            self.index.train(vectors)
            self.index.nprobe = min(nprobe, nlist)
        else:
            raise ValueError(f"kind must be auto, exact, hnsw or ivf, got {kind!r}")
        self.index.add(vectors)

    def search(self, queries: np.ndarray, k: int, exclude: list[set] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` ids and scores per query (``[Q, k]``; -1 / -inf pad when fewer exist)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        extra = max((len(e) for e in exclude), default=0) if exclude else 0
        depth = min(k + extra, len(self.ids))
        scores, positions = self.index.search(queries, depth)
        out_ids = np.full((len(queries), k), -1, dtype=self.ids.dtype if self.ids.dtype.kind in "iu" else object)
        out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        for q in range(len(queries)):
            found = [(self.ids[p], s) for p, s in zip(positions[q], scores[q], strict=True) if p >= 0]
            if exclude:
                found = [(i, s) for i, s in found if i not in exclude[q]]
            found = found[:k]
            out_ids[q, : len(found)] = [i for i, _ in found]
            out_scores[q, : len(found)] = [s for _, s in found]
        return out_ids, out_scores
