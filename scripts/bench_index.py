"""Compressed retrieval indexes: bytes per item, Recall@50 against exact fp32 search, query latency.

    python scripts/bench_index.py                        # ml100k-cold seeds 1 2 3 + 200k synthetic items
    python scripts/bench_index.py --data data/ml100k-ctr --seeds 1 --synthetic-items 0

``--data`` (ml100k-cold by default, the protocol of ``bench_text``): one two-tower per seed
(``configs/movielens/two_tower.yaml``, trained by ``scripts/bench_text.py``'s runner: the same runs as
``bench_text.py --data <data>``, reused from runs/bench_text when their fingerprint matches) gives
the ID vectors; the content vectors are the items' titles through all-MiniLM-L6-v2 with mean pooling.
For each codec of ``recsys retrieve --index`` both lists are searched for every test user (items seen
in train excluded): Recall@50 (mean ± std over seeds), the same relative to the fp32 index of that
seed and a paired bootstrap interval over users of the difference, bytes per item and latency per user.
Synthetic: a catalogue of ``--synthetic-items`` unit vectors (64 dims, 1,000 Gaussian clusters) and
1,000 queries near them; Recall@50 of each codec against the exact fp32 top 50.
Writes runs/bench_index/results.json, docs/index_recall_bytes.png and the ``bench_index`` block.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from bench_text import fit
from benchdoc import machine, write_doc_section

from recsys.eval.metrics import paired_bootstrap_interval, recall_per_user
from recsys.retrieval.evaluate import Queries, Retriever
from recsys.retrieval.index import VectorIndex
from recsys.train.checkpoint import load_model

OUT = Path("runs/bench_index")
CODECS = [("fp32", 0), ("fp16", 0), ("int8", 0), ("pq", 0), ("binary", 0), ("binary", 10)]
K, REPEATS = 50, 5


def label(codec: str, rerank: int) -> str:
    return f"{codec} + fp32 re-rank of top {rerank}×{K}" if rerank else codec


def timed_search(index: VectorIndex, users: np.ndarray, exclude: list[set] | None) -> tuple[list, float]:
    """The ranked lists and the median over ``REPEATS`` of the seconds per user for the whole batch."""
    seconds = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        ids, _ = index.search(users, K, exclude)
        seconds.append((time.perf_counter() - start) / len(users))
    return [[int(i) for i in row if i >= 0] for row in ids], float(np.median(seconds))


def ml100k(seeds: list[int], data: str) -> dict:
    """Per codec and list (id, text): per-seed recall, per-user recall (seed mean), bytes, latency."""
    results: dict = {}
    for seed in seeds:
        tower = fit(
            f"{Path(data).name}/two_tower_s{seed}", seed, ["configs/movielens/two_tower.yaml"], data, (), ("val",)
        )
        retriever = Retriever(load_model(tower["ckpt"]), Path(data), "movie_title", "mean")
        queries = Queries(retriever.catalogue, "test", retriever.user, retriever.item, retriever.label)
        users = dict(zip(("id", "text"), retriever.user_vectors(queries), strict=True))
        for codec, rerank in CODECS:
            retriever.build_indexes(codec, rerank)
            for name, index in (("id", retriever.index_id), ("text", retriever.index_text)):
                ranked, latency = timed_search(index, users[name], queries.seen)
                cell = results.setdefault(label(codec, rerank), {}).setdefault(name, {"recall": [], "users": []})
                cell["recall"].append(float(np.mean(recall_per_user(ranked, queries.positives, K))))
                cell["users"].append(recall_per_user(ranked, queries.positives, K))
                cell.update(bytes=index.bytes_per_item, rerank_bytes=index.rerank_bytes_per_item)
                cell.setdefault("latency", []).append(latency)
    return results


def synthetic(items: int, dim: int = 64, clusters: int = 1000, queries: int = 1000) -> dict:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    vectors = centres[rng.integers(0, clusters, items)] + 0.5 * rng.normal(size=(items, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    users = vectors[rng.integers(0, items, queries)] + 0.3 * rng.normal(size=(queries, dim)).astype(np.float32)
    truth, _ = timed_search(VectorIndex(vectors, kind="exact"), users, None)
    results = {}
    for codec, rerank in CODECS:
        start = time.perf_counter()
        index = VectorIndex(vectors, kind="exact", codec=codec, rerank=rerank)
        build = time.perf_counter() - start
        ranked, latency = timed_search(index, users, None)
        overlap = np.mean([len(set(r) & set(t)) / K for r, t in zip(ranked, truth, strict=True)])
        results[label(codec, rerank)] = {
            "recall_vs_exact": float(overlap),
            "bytes": index.bytes_per_item,
            "rerank_bytes": index.rerank_bytes_per_item,
            "latency": latency,
            "build_seconds": build,
        }
    return results


def plot(ml: dict, synth: dict, path: Path, data: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if synth else 1, figsize=(11 if synth else 6, 4), squeeze=False)
    for name, marker in (("id", "o"), ("text", "s")):
        fp32 = np.mean(ml["fp32"][name]["recall"])
        for codec, cells in ml.items():
            x, y = cells[name]["bytes"], np.mean(cells[name]["recall"]) / fp32
            axes[0, 0].scatter(x, y, marker=marker, label=f"{name}: {codec}")
    axes[0, 0].set(
        xscale="log", xlabel="bytes per item (code)", ylabel="Recall@50 / fp32's", title=f"{Path(data).name} test"
    )
    axes[0, 0].legend(fontsize=6)
    if synth:
        for codec, cell in synth.items():
            axes[0, 1].scatter(cell["bytes"], cell["recall_vs_exact"], label=codec)
        axes[0, 1].set(xscale="log", xlabel="bytes per item (code)", ylabel="overlap with exact top 50")
        axes[0, 1].set_title("synthetic catalogue")
        axes[0, 1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(args: argparse.Namespace, ml: dict, synth: dict, seconds: float) -> str:
    command = f"python scripts/bench_index.py --data {args.data} --seeds {' '.join(map(str, args.seeds))}"
    lines = [
        f"`{command} --synthetic-items {args.synthetic_items}` — {machine()}, {torch.get_num_threads()} "
        f"threads, {seconds / 60:.0f} min. {Path(args.data).name} test users, items seen in train excluded, Recall@{K} "
        f"mean ± std over seeds {args.seeds} (one two-tower per seed; text = titles, MiniLM, mean pooling). "
        f"Relative = Recall@{K} / the fp32 index's of the same seed, mean over seeds; Δ = per-user Recall@{K} "
        "minus fp32's (seed mean), paired bootstrap over users, 95%. Bytes = one item's code (the fp32 "
        "re-rank keeps 4·D more bytes per item beside it); latency = one batch of every test user through "
        f"faiss and the seen-item filter, median of {REPEATS} repeats, per user.",
        "",
        f"| index | list | bytes/item | Recall@{K} | relative | Δ vs fp32 [95% CI] | µs per user |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for codec, lists in ml.items():
        for name, cell in lists.items():
            fp32 = ml["fp32"][name]
            relative = np.mean(np.array(cell["recall"]) / np.array(fp32["recall"]))
            a, b = np.mean(cell["users"], axis=0), np.mean(fp32["users"], axis=0)
            delta = (
                "—"
                if codec == "fp32"
                else "{:+.4f} [{:+.4f}, {:+.4f}]".format((a - b).mean(), *paired_bootstrap_interval(a, b))
            )
            extra = f" (+{cell['rerank_bytes']})" if cell["rerank_bytes"] else ""
            lines.append(
                f"| {codec} | {name} | {cell['bytes']}{extra} | {np.mean(cell['recall']):.4f} ± "
                f"{np.std(cell['recall']):.4f} | {relative:.3f} | {delta} | {1e6 * np.median(cell['latency']):.0f} |"
            )
    if synth:
        lines += [
            "",
            f"Synthetic catalogue: {args.synthetic_items:,} items × 64 dims (1,000 Gaussian clusters), 1,000 "
            f"queries; overlap of each index's top {K} with the exact fp32 top {K}.",
            "",
            f"| index | bytes/item | overlap with exact top {K} | µs per query | build s |",
            "|---|---:|---:|---:|---:|",
        ]
        for codec, cell in synth.items():
            extra = f" (+{cell['rerank_bytes']})" if cell["rerank_bytes"] else ""
            lines.append(
                f"| {codec} | {cell['bytes']}{extra} | {cell['recall_vs_exact']:.3f} | "
                f"{1e6 * cell['latency']:.0f} | {cell['build_seconds']:.1f} |"
            )
    lines += ["", "![Recall@50 vs bytes per item](index_recall_bytes.png)"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/ml100k-cold")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--synthetic-items", type=int, default=200_000, help="0: skip the synthetic catalogue")
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    start = time.perf_counter()
    ml = ml100k(args.seeds, args.data)
    synth = synthetic(args.synthetic_items) if args.synthetic_items else {}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps({"ml100k": ml, "synthetic": synth}))
    text = markdown(args, ml, synth, time.perf_counter() - start)
    print(text)
    if not args.no_doc:
        plot(ml, synth, Path("docs/index_recall_bytes.png"), args.data)
        write_doc_section("docs/benchmarks.md", "bench_index", text)


if __name__ == "__main__":
    main()
