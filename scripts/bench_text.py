"""Text features and hybrid retrieval on ml100k-ctr: pooling heads compared, ID vs content vs hybrid.

    python scripts/bench_text.py                          # six heads, seeds 1 2 3
    python scripts/bench_text.py --heads mean gem --seeds 1 2

1. DIN without text and DIN with movie-title vectors (all-MiniLM-L6-v2, frozen, pooled by each
   head, concatenated to the item ID embedding of target and behaviors): val and test AUC per seed.
2. A two-tower model per seed (``configs/movielens/two_tower.yaml``), then ``recsys retrieve``:
   ID-only, text-only (a trainable head as its DIN run of that seed learned it), hybrid (RRF,
   learned weight α) and hybrid + DIN re-ranking, Recall/NDCG@50 overall and on cold items.
Every choice is made on val through ``recsys.eval.selection.best_on_val``: the DIN re-ranker (mean
val AUC over seeds), the content head and text columns (mean val text Recall@50 over seeds), α
(inside ``recsys retrieve``). Test is read once per reported number. Per-user Recall@50 averaged
over seeds gives paired bootstrap intervals over users. Finished runs under runs/bench_text are
reused when their fingerprint (config text, seed, options) is the same.
Writes runs/bench_text/results.json and the ``bench_text`` block of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from benchdoc import machine, reused_or_run, write_doc_section

from recsys.eval.metrics import paired_bootstrap_interval
from recsys.eval.report import evaluate
from recsys.eval.selection import best_on_val
from recsys.text.pooling import HEADS
from recsys.train.cli import run

OUT = Path("runs/bench_text")
DEFAULT_HEADS = ["mean", "cls", "last", "max", "gem", "attention"]  # latent, multilayer: --heads
TEXT_COLUMNS = {"title": [], "title + genres": ["genres"]}  # what the content text of an item reads
K = 50


def fit(version: str, seed: int, configs: list[str]) -> dict:
    """Trains once per fingerprint; ``{"ckpt", "val", "test", "fingerprint"}`` (val/test: CTR metrics)."""

    def train() -> dict:
        args = ["fit"] + [a for c in configs for a in ("--config", c)]
        cli = run(
            args
            + [
                "--seed_everything",
                str(seed),
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.logger.init_args.save_dir",
                str(OUT),
                "--trainer.logger.init_args.name",
                "",
                "--trainer.logger.init_args.version",
                version,
            ]
        )
        ckpt = Path(cli.trainer.checkpoint_callback.best_model_path)
        scores = {}
        for split in ("val", "test"):
            report = evaluate(ckpt, split=split, out=OUT / version / f"eval_{split}", bootstrap=0)
            scores[split] = {m: float(report[m]) for m in ("auc", "gauc")}
        return {"ckpt": str(ckpt), **scores}

    return reused_or_run(OUT / version, [[Path(c).read_text() for c in configs], seed], train)


def retrieve(name: str, runs: dict[str, dict], split: str, columns: list[str]) -> dict:
    """``recsys retrieve`` with the two-tower (and text head / DIN) of ``runs``; reused by fingerprint."""
    from recsys.commands.retrieve import main as retrieve_main

    out = OUT / "retrieval" / name
    args = ["--two-tower", runs["two_tower"]["ckpt"], "--split", split, "--k", str(K), "--out", str(out)]
    if "head" in runs:
        args += ["--text-head", runs["head"]["ckpt"]]
    if "din" in runs:
        args += ["--din", runs["din"]["ckpt"]]
    if columns:
        args += ["--text-with", *columns]

    def compute() -> dict:
        assert retrieve_main(args) == 0
        return json.loads((out / "report.json").read_text())

    return reused_or_run(out, [args, {k: r["fingerprint"] for k, r in runs.items()}], compute)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", nargs="+", default=DEFAULT_HEADS, choices=list(HEADS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    start = time.perf_counter()
    din = "configs/movielens/din.yaml"
    seeds = args.seeds
    dins = {"none": [fit(f"din_s{s}", s, [din]) for s in seeds]}
    for head in args.heads:
        dins[head] = [fit(f"din_text_{head}_s{s}", s, [din, f"configs/text/{head}.yaml"]) for s in seeds]
    towers = [fit(f"two_tower_s{s}", s, ["configs/movielens/two_tower.yaml"]) for s in seeds]

    def per_seed(runs: list[dict], split: str, metric: str) -> list[float]:
        return [r[split][metric] for r in runs]

    ctr = {h: {sp: {"auc": per_seed(r, sp, "auc")} for sp in ("val", "test")} for h, r in dins.items()}
    reranker = best_on_val({h: ctr[h] for h in args.heads}, "auc")
    # content head and text columns together, on val text Recall@K (mean over seeds)
    content = {}
    for head in args.heads:
        for label, columns in TEXT_COLUMNS.items():
            recalls = [
                retrieve(f"val_{head}_{label}_s{s}", {"two_tower": t, "head": d}, "val", columns)["results"]["text"]
                for s, t, d in zip(seeds, towers, dins[head], strict=True)
            ]
            content[(head, label)] = {"val": {"recall": [r[f"recall@{K}"] for r in recalls]}}
    head, label = best_on_val(content, "recall")
    columns = TEXT_COLUMNS[label]
    text_test = {
        h: [
            retrieve(f"test_{h}_{label}_s{s}", {"two_tower": t, "head": d}, "test", columns)["results"]["text"]
            for s, t, d in zip(seeds, towers, dins[h], strict=True)
        ]
        for h in args.heads
    }
    hybrid = [
        retrieve(f"hybrid_s{s}", {"two_tower": t, "head": d, "din": r}, "test", columns)
        for s, t, d, r in zip(seeds, towers, dins[head], dins[reranker], strict=True)
    ]
    results = {
        "ctr": ctr,
        "reranker": reranker,
        "content_head": head,
        "text_columns": label,
        "content_val": {f"{h} / {c}": v for (h, c), v in content.items()},
        "retrieval": hybrid,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    text_md = markdown(args, results, text_test, time.perf_counter() - start)
    print(text_md)
    if not args.no_doc:
        write_doc_section("docs/benchmarks.md", "bench_text", text_md)


def mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.4f} ± {np.std(values):.4f}"


def markdown(args: argparse.Namespace, results: dict, text_test: dict, seconds: float) -> str:
    ctr, hybrid = results["ctr"], results["retrieval"]
    none = np.array(ctr["none"]["test"]["auc"])
    first = hybrid[0]
    lines = [
        f"`python scripts/bench_text.py --heads {' '.join(args.heads)} --seeds {' '.join(map(str, args.seeds))}` — "
        f"{machine()}; ml100k-ctr, item text = movie title through all-MiniLM-L6-v2 (frozen, offline); "
        f"{seconds / 60:.0f} min (runs under runs/bench_text are reused when their fingerprint matches). "
        "DIN = `configs/movielens/din.yaml`, with text `--config configs/text/<head>.yaml` (title vector "
        "projected to 4 and concatenated to the item ID embedding of the target and of every behavior). "
        f"Mean ± std over seeds {args.seeds}; every choice made on val (`recsys.eval.selection`). Content "
        f"retrieval: the head's vector of each item's text (`{results['text_columns']}`, chosen on val), the "
        "head as that seed's DIN run learned it; user = mean of their train clicks' vectors, cosine, items "
        f"seen in train excluded; Recall/NDCG@{K} over {first['users']} test users.",
        "",
        f"| item text in DIN | DIN val AUC | DIN test AUC | Δ test vs no text | content Recall@{K} (test) | NDCG@{K} |",
        "|---|---:|---:|---:|---:|---:|",
        f"| none | {mean_std(ctr['none']['val']['auc'])} | {mean_std(none)} | — | — | — |",
    ]
    for head, runs in text_test.items():
        aucs = np.array(ctr[head]["test"]["auc"])
        lines.append(
            f"| {head} | {mean_std(ctr[head]['val']['auc'])} | {mean_std(aucs)} | {aucs.mean() - none.mean():+.4f} | "
            f"{mean_std([r[f'recall@{K}'] for r in runs])} | {mean_std([r[f'ndcg@{K}'] for r in runs])} |"
        )
    per_user = {
        name: np.mean([np.array(r["results"][name][f"user_recall@{K}"]) for r in hybrid], axis=0)
        for name in first["results"]
    }
    lines += [
        "",
        f"Retrieval on the test split ({first['catalogue']} items, {first['cold_items']} cold; "
        f"{first['results']['id']['cold_users']} users with a cold positive), one two-tower per seed; chosen on "
        f"val: content head `{results['content_head']}`, text `{results['text_columns']}`, DIN re-ranker with "
        f"`{results['reranker']}` text (best mean val AUC), α per seed {[r['alpha'] for r in hybrid]}; DIN "
        f"re-ranks the top {first['rerank_depth']}. Δ vs id: per-user Recall@{K} averaged over seeds, paired "
        "bootstrap over users (2,000 draws), 95% interval.",
        "",
        f"| retrieval | Recall@{K} | NDCG@{K} | cold-item Recall@{K} | Δ Recall@{K} vs id [95% CI] |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in first["results"]:
        runs = [r["results"][name] for r in hybrid]
        if name == "id":
            delta = "—"
        else:
            low, high = paired_bootstrap_interval(per_user[name], per_user["id"])
            delta = f"{per_user[name].mean() - per_user['id'].mean():+.4f} [{low:+.4f}, {high:+.4f}]"
        lines.append(
            f"| {name} | {mean_std([m[f'recall@{K}'] for m in runs])} | {mean_std([m[f'ndcg@{K}'] for m in runs])} | "
            f"{mean_std([m[f'cold_recall@{K}'] for m in runs])} | {delta} |"
        )
    missing = [h for h in HEADS if h not in args.heads]
    if missing:
        lines += ["", f"Not run in this invocation (no number here): {', '.join(f'`{h}`' for h in missing)}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
