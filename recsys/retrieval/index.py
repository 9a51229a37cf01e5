"""Nearest-neighbour search over item vectors (faiss, inner product on normalized vectors).

``VectorIndex(vectors, ids, codec=...)`` stores the ``[N, D]`` vectors as

- ``fp32``: exact (``IndexFlatIP``) up to ``exact_limit`` items, HNSW above it (``kind="hnsw"``), or
  IVF (``kind="ivf"``);
- ``fp16`` / ``int8``: scalar quantization (``IndexScalarQuantizer``; int8 with a per-dimension range
  trained on the vectors), exhaustive search over the codes;
- ``pq``: product quantization (``IndexPQ``: D/4 sub-vectors, ``log2(N/39)`` bits each, at most 8 —
  faiss's minimum of 39 training points per centroid), exhaustive asymmetric-distance search;
- ``binary``: one sign bit per dimension (``IndexBinaryFlat``), Hamming search, score = D − 2·Hamming
  (the inner product of the ±1 sign vectors). With ``rerank=R`` the top ``R·depth`` by Hamming distance
  are re-ordered by their fp32 inner product; the fp32 vectors are then kept beside the codes.

``bytes_per_item`` is one item's code; ``rerank_bytes_per_item`` the fp32 vector kept for re-ranking
(0 when none). ``search`` can exclude, per query, ids the user has already seen (docs/protocols.md:
items seen in train are not candidates). ``save(directory)`` / ``VectorIndex.load(directory)`` write
and read an index with a manifest of sizes and SHA-256 checksums, under the rules of table exports:
every file inside the directory, checked before faiss or numpy reads it, no pickled objects.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import faiss
import numpy as np

CODECS = ("fp32", "fp16", "int8", "pq", "binary")
MANIFEST = "index.json"
FORMAT, FORMAT_VERSION = "recsys-vector-index", 1


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
        codec: str = "fp32",
        rerank: int = 0,
    ) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) == 0:
            raise ValueError(f"vectors must be a non-empty [N, E] array, got shape {vectors.shape}")
        self.ids = np.arange(len(vectors)) if ids is None else np.asarray(ids)
        if len(self.ids) != len(vectors):
            raise ValueError(f"{len(self.ids)} ids for {len(vectors)} vectors")
        if codec not in CODECS:
            raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")
        if codec != "fp32" and kind not in ("auto", "exact"):
            raise ValueError(f"codec {codec!r} searches its codes exhaustively; kind {kind!r} is for fp32 only")
        if rerank < 0 or (rerank and codec != "binary"):
            raise ValueError(f"rerank={rerank}: a non-negative candidate factor, for the binary codec only")
        self.codec, self.rerank, self.dim = codec, rerank, vectors.shape[1]
        self.vectors = vectors if rerank else None  # fp32 copies for re-ranking binary candidates
        if codec == "fp32":
            self.kind = ("exact" if len(vectors) <= exact_limit else "hnsw") if kind == "auto" else kind
        else:
            self.kind = "exact"
        self.index = self._build(vectors, hnsw_m, ef_search, nprobe)
        self.index.add(_binary_codes(vectors) if codec == "binary" else vectors)

    def _build(self, vectors: np.ndarray, hnsw_m: int, ef_search: int, nprobe: int):  # noqa: ANN202
        dim, ip = self.dim, faiss.METRIC_INNER_PRODUCT
        if self.codec == "binary":
            return faiss.IndexBinaryFlat(8 * math.ceil(dim / 8))
        if self.codec in ("fp16", "int8"):
            quantizer = faiss.ScalarQuantizer.QT_fp16 if self.codec == "fp16" else faiss.ScalarQuantizer.QT_8bit
            index = faiss.IndexScalarQuantizer(dim, quantizer, ip)
            index.train(vectors)
            return index
        if self.codec == "pq":
            bits = min(8, int(math.log2(len(vectors) / 39))) if len(vectors) >= 78 else 0
            if bits < 1:
                raise ValueError(f"codec 'pq' needs at least 78 vectors to train (39 per centroid), got {len(vectors)}")
            index = faiss.IndexPQ(dim, _subvectors(dim), bits, ip)
            index.train(vectors)
            return index
        if self.kind == "exact":
            return faiss.IndexFlatIP(dim)
        if self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, hnsw_m, ip)
            index.hnsw.efSearch = ef_search
            return index
        if self.kind == "ivf":
            nlist = max(1, int(4 * math.sqrt(len(vectors))))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, ip)
            index.train(vectors)
            index.nprobe = min(nprobe, nlist)
            return index
        raise ValueError(f"kind must be auto, exact, hnsw or ivf, got {self.kind!r}")

    @property
    def bytes_per_item(self) -> int:
        """Bytes of one item's code in the index (faiss's ``code_size``; fp32/HNSW/IVF: the raw vector)."""
        return int(getattr(self.index, "code_size", 4 * self.dim))

    @property
    def rerank_bytes_per_item(self) -> int:
        return 4 * self.dim if self.vectors is not None else 0

    def _nearest(self, queries: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """faiss's ``[Q, depth]`` (scores, positions), -1 where fewer exist; binary re-ranked if asked."""
        if self.codec != "binary":
            return self.index.search(queries, depth)
        wide = min(len(self.ids), depth * max(1, self.rerank))
        hamming, positions = self.index.search(_binary_codes(queries), wide)
        scores = (self.dim - 2 * hamming).astype(np.float32)
        if self.vectors is not None:
            exact = np.einsum("qd,qkd->qk", queries, self.vectors[np.maximum(positions, 0)])
            scores = np.where(positions >= 0, exact, -np.inf).astype(np.float32)
            order = np.argsort(-scores, axis=1, kind="stable")
            scores, positions = np.take_along_axis(scores, order, 1), np.take_along_axis(positions, order, 1)
        return scores[:, :depth], positions[:, :depth]

    def search(self, queries: np.ndarray, k: int, exclude: list[set] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` ids and scores per query (``[Q, k]``; -1 / -inf pad when fewer exist)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        extra = max((len(e) for e in exclude), default=0) if exclude else 0
        depth = min(k + extra, len(self.ids))
        scores, positions = self._nearest(queries, depth)
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

    def save(self, directory: str | Path, source: dict | None = None) -> Path:
        """Writes the index, its ids (and re-rank vectors) and ``index.json`` into a new ``directory``."""
        from recsys.export.exporter import sha256

        directory = Path(directory)
        if directory.exists() and any(directory.iterdir()):
            raise FileExistsError(f"{directory} exists and is not empty; choose a new directory for the index")
        directory.mkdir(parents=True, exist_ok=True)
        write = faiss.write_index_binary if self.codec == "binary" else faiss.write_index
        write(self.index, str(directory / "index.faiss"))
        ids = self.ids.astype(str) if self.ids.dtype.kind == "O" else self.ids
        np.save(directory / "ids.npy", ids, allow_pickle=False)
        if self.vectors is not None:
            np.save(directory / "vectors.npy", self.vectors, allow_pickle=False)
        files = sorted(p.name for p in directory.iterdir())
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "codec": self.codec,
            "kind": self.kind,
            "dim": self.dim,
            "items": len(self.ids),
            "rerank": self.rerank,
            "bytes_per_item": self.bytes_per_item,
            "source": source or {},
            "files": {f: {"sha256": sha256(directory / f), "bytes": (directory / f).stat().st_size} for f in files},
        }
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> VectorIndex:
        """An index written by ``save``, after its manifest's format and every file's size and checksum."""
        from recsys.export.loader import ExportError, check_files

        directory = Path(directory)
        path = directory / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except FileNotFoundError as err:
            raise ExportError(f"{path}: not found (is {directory} an index written by --save-index?)") from err
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ExportError(f"{path}: corrupt manifest ({err})") from err
        if (manifest.get("format"), manifest.get("format_version")) != (FORMAT, FORMAT_VERSION):
            raise ExportError(f"{path}: not a {FORMAT} version {FORMAT_VERSION} manifest")
        files = manifest.get("files", {})
        needed = ["index.faiss", "ids.npy"] + (["vectors.npy"] if manifest.get("rerank") else [])
        if missing := [f for f in needed if f not in files]:
            raise ExportError(f"{path}: {missing} have no checksum in the manifest")
        if manifest.get("codec") not in CODECS:
            raise ExportError(f"{path}: codec {manifest.get('codec')!r} is not one of {CODECS}")
        check_files(directory, files, MANIFEST)
        index = cls.__new__(cls)
        index.codec, index.kind, index.rerank = manifest["codec"], manifest["kind"], int(manifest["rerank"])
        read = faiss.read_index_binary if index.codec == "binary" else faiss.read_index
        index.index = read(str(directory / "index.faiss"))
        index.ids = np.load(directory / "ids.npy", allow_pickle=False)
        index.vectors = np.load(directory / "vectors.npy", allow_pickle=False) if index.rerank else None
        index.dim = int(manifest["dim"])
        if index.index.ntotal != len(index.ids) or (index.vectors is not None and len(index.vectors) != len(index.ids)):
            raise ExportError(f"{directory}: the index holds {index.index.ntotal} items for {len(index.ids)} ids")
        return index


def _binary_codes(vectors: np.ndarray) -> np.ndarray:
    """``[N, ceil(D/8)]`` uint8: bit j of a row is set when dimension j is positive (padding bits 0)."""
    return np.packbits(vectors > 0, axis=1)


def _subvectors(dim: int) -> int:
    """PQ sub-quantizers: D/4 when 4 divides D, else the largest divisor of D not above D/4 (at least 1)."""
    return next(m for m in range(max(1, dim // 4), 0, -1) if dim % m == 0)
