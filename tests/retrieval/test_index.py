"""Compressed vector indexes (``recsys.retrieval.index``) against plain numpy references, and their files."""

import json
from pathlib import Path

import numpy as np
import pytest

from recsys.export.loader import ExportError
from recsys.retrieval.index import CODECS, VectorIndex

N, D, K = 2000, 30, 10  # D not a multiple of 8: binary codes carry padding bits


@pytest.fixture(scope="module")
def vectors() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    items = rng.normal(size=(N, D)).astype(np.float32)
    queries = rng.normal(size=(25, D)).astype(np.float32)
    return items / np.linalg.norm(items, axis=1, keepdims=True), queries


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    return np.sort(scores, axis=1)[:, ::-1][:, :k]


def test_fp16_scores_are_the_inner_products_with_half_precision_items(vectors) -> None:  # noqa: ANN001
    items, queries = vectors
    ids, scores = VectorIndex(items, codec="fp16").search(queries, K)
    reference = queries @ items.astype(np.float16).astype(np.float32).T
    np.testing.assert_allclose(scores, np.take_along_axis(reference, ids, 1), atol=1e-4)
    np.testing.assert_allclose(scores, _top(reference, K), atol=1e-4)  # the k best, in order


def test_int8_scores_lie_within_the_quantization_bound(vectors) -> None:  # noqa: ANN001
    items, queries = vectors
    index = VectorIndex(items, codec="int8")
    ids, scores = index.search(queries, K)
    assert index.bytes_per_item == D  # one byte per dimension
    exact = queries @ items.T
    # 8 bits over each dimension's [min, max]: |x̂_j − x_j| ≤ (max_j − min_j) / 255, so an inner product
    # moves by at most Σ_j |q_j|·(max_j − min_j) / 255
    bound = np.abs(queries) @ (items.max(0) - items.min(0)) / 255
    assert np.all(np.abs(scores - np.take_along_axis(exact, ids, 1)) <= bound[:, None] + 1e-6)
    assert np.all(np.take_along_axis(exact, ids, 1)[:, -1] >= _top(exact, K)[:, -1] - 2 * bound)


def test_binary_scores_are_the_inner_products_of_sign_vectors(vectors) -> None:  # noqa: ANN001
    items, queries = vectors
    index = VectorIndex(items, codec="binary")
    ids, scores = index.search(queries, K)
    assert index.bytes_per_item == 4 and index.rerank_bytes_per_item == 0  # 30 bits in 4 bytes
    signs = lambda x: np.where(x > 0, 1.0, -1.0)  # noqa: E731
    reference = np.zeros((len(queries), N))
    for q in range(len(queries)):  # D − 2·Hamming, one pair at a time
        for i in range(N):
            reference[q, i] = D - 2 * int(np.sum((queries[q] > 0) != (items[i] > 0)))
    np.testing.assert_array_equal(reference, signs(queries) @ signs(items).T)
    np.testing.assert_array_equal(scores, np.take_along_axis(reference, ids, 1))
    np.testing.assert_array_equal(scores, _top(reference, K))


def test_binary_rerank_orders_candidates_by_fp32_and_covers_everything_when_wide(vectors) -> None:  # noqa: ANN001
    items, queries = vectors
    exact = queries @ items.T
    reranked = VectorIndex(items, codec="binary", rerank=5)
    ids, scores = reranked.search(queries, K)
    np.testing.assert_allclose(scores, np.take_along_axis(exact, ids, 1), rtol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 0) and reranked.rerank_bytes_per_item == 4 * D
    ids, _ = VectorIndex(items, codec="binary", rerank=N).search(queries, K)  # every item is a candidate
    np.testing.assert_array_equal(ids, np.argsort(-exact, axis=1, kind="stable")[:, :K])


def test_pq_searches_its_reconstructions_exactly_and_compresses(vectors) -> None:  # noqa: ANN001
    items, queries = vectors
    index = VectorIndex(items, codec="pq")
    # 30 dims → 6 sub-vectors of 5 (the largest divisor ≤ 30/4); 2000/39 points per centroid → 5 bits
    assert index.index.pq.M == 6 and index.index.pq.nbits == 5 and index.bytes_per_item == 4
    decoded = index.index.reconstruct_n(0, N)
    assert np.abs(decoded - items).max() > 1e-3  # lossy
    ids, scores = index.search(queries, K)
    reference = queries @ decoded.T
    np.testing.assert_allclose(scores, np.take_along_axis(reference, ids, 1), atol=1e-4)
    np.testing.assert_allclose(scores, _top(reference, K), atol=1e-4)
    with pytest.raises(ValueError, match="at least 78 vectors"):
        VectorIndex(items[:50], codec="pq")


def test_bad_arguments_are_refused(vectors) -> None:  # noqa: ANN001
    items, _ = vectors
    with pytest.raises(ValueError, match="codec must be one of"):
        VectorIndex(items, codec="int4")
    with pytest.raises(ValueError, match="kind 'hnsw' is for fp32 only"):
        VectorIndex(items, codec="int8", kind="hnsw")
    with pytest.raises(ValueError, match="for the binary codec only"):
        VectorIndex(items, codec="fp16", rerank=3)


@pytest.mark.parametrize("codec", CODECS)
def test_a_saved_index_loads_and_searches_the_same(vectors, codec: str, tmp_path: Path) -> None:  # noqa: ANN001
    items, queries = vectors
    index = VectorIndex(items, ids=np.arange(N) + 7, codec=codec, rerank=3 if codec == "binary" else 0)
    exclude = [{7, 8}] * len(queries)
    loaded = VectorIndex.load(index.save(tmp_path / "ix", source={"vectors": "test"}))
    for a, b in zip(index.search(queries, K, exclude), loaded.search(queries, K, exclude), strict=True):
        np.testing.assert_array_equal(a, b)
    assert loaded.bytes_per_item == index.bytes_per_item and loaded.codec == codec


def test_an_altered_or_escaping_index_is_refused_before_it_is_read(vectors, tmp_path: Path) -> None:  # noqa: ANN001
    items, _ = vectors
    directory = VectorIndex(items, codec="int8").save(tmp_path / "ix")
    with pytest.raises(FileExistsError, match="not empty"):
        VectorIndex(items).save(directory)
    data = bytearray((directory / "index.faiss").read_bytes())
    data[-1] ^= 1
    (directory / "index.faiss").write_bytes(bytes(data))
    with pytest.raises(ExportError, match="index.faiss: SHA-256 does not match"):
        VectorIndex.load(directory)
    data[-1] ^= 1
    (directory / "index.faiss").write_bytes(bytes(data))
    manifest = json.loads((directory / "index.json").read_text())
    manifest["files"]["../../etc/hostname"] = {"bytes": 1, "sha256": "0"}
    (directory / "index.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="not a relative path inside"):
        VectorIndex.load(directory)
    (directory / "index.json").write_text(json.dumps(manifest | {"format_version": 9}))
    with pytest.raises(ExportError, match="not a recsys-vector-index version 1"):
        VectorIndex.load(directory)


def test_retrieve_refuses_a_non_empty_save_index_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from recsys.commands.retrieve import main

    (tmp_path / "ix").mkdir()
    (tmp_path / "ix" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit):
        main(["--two-tower", "tt.ckpt", "--out", str(tmp_path / "o"), "--save-index", str(tmp_path / "ix")])
    assert "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "ix" / "keep.txt").read_text() == "mine"
