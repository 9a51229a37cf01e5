"""Text features and hybrid retrieval where content should pay off: items without train clicks.

    python scripts/bench_text.py                                   # ml100k-cold, eight heads, seeds 1 2 3
    python scripts/bench_text.py --data data/ml100k-ctr --heads mean gem --seeds 1 2

Data: ml100k-cold (docs/datasets.md; ``datasets/movielens/prepare.py --cold-items 0.2``, prepared when
missing): 20% of the items have no train row, val and test are ml100k-ctr's.
1. DIN without text and with each head (``--config configs/text/<head>.yaml``: movie-title vectors
   from all-MiniLM-L6-v2, frozen, pooled by the head, joined to the item ID embedding of target and
   behaviors): val/test AUC and GAUC per seed, and its training samples/s (the run's own meter,
   epochs after the first).
2. One two-tower per seed (``configs/movielens/two_tower.yaml``) and one hybrid tower per seed and
   ID dropout (``configs/text/hybrid_tower.yaml`` on top: item text in the item tower, a share of
   the item ID rows dropped in training so that cold items are placed by their text), then
   ``recsys retrieve`` at K = 10 and 50: ID, content (each head as its DIN run of that seed learned
   it), RRF, the hybrid tower, the learned hybrid (hybrid tower fused with content), hybrid + DIN
   re-rank; overall, on cold and on warm positives.
Every choice is made on val through ``recsys.eval.selection.best_on_val``: the DIN re-ranker (mean
val AUC over seeds, "none" included), the content head with its text columns (mean val content
Recall@50), the hybrid tower's ID dropout (mean val Recall@50 of the learned hybrid), the re-rank
depth (mean val Recall@50 of hybrid + DIN), α (inside ``recsys retrieve --cold-floor``, per seed). Test is read
once per reported number. Per-user Recall@50 averaged over seeds gives the paired bootstrap
intervals over users. Finished runs under runs/bench_text are reused when their
fingerprint (config text, seed, data, options) is the same.
Writes runs/bench_text/results.json and the ``bench_text`` block of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from benchdoc import machine, reused_or_run, write_doc_section

from recsys.eval.metrics import paired_bootstrap_interval
from recsys.eval.report import evaluate
from recsys.eval.selection import best_on_val
from recsys.text.pooling import HEADS
from recsys.train.callbacks import Throughput
from recsys.train.cli import run

OUT = Path("runs/bench_text")
TEXT_COLUMNS = {"title": [], "title + genres": ["genres"]}  # what the content text of an item reads
KS = [10, 50]
K = KS[-1]
DEPTHS = [50, 100, 200]  # DIN re-ranks this many of the hybrid's candidates: chosen on val
HYBRID = ["configs/movielens/two_tower.yaml", "configs/text/hybrid_tower.yaml"]
ID_DROPOUTS = [0.1, 0.3, 0.5]
SPLITS = ("val", "test")  # the hybrid tower's share of dropped item ID rows: chosen on val


def prepared(data: str) -> str:
    """The dataset's PREPARED.json (what a reused run is keyed by); ml100k-cold is prepared if missing."""
    marker = Path(data) / "PREPARED.json"
    if not marker.exists() and Path(data).name == "ml100k-cold":
        prepare = [sys.executable, "datasets/movielens/prepare.py", "--out", data, "--cold-items", "0.2"]
        subprocess.run(prepare, check=True)
    return marker.read_text()


def fit(
    version: str, seed: int, configs: list[str], data: str = "data/ml100k-ctr", overrides: tuple = (), splits=SPLITS
) -> dict:
    """Trains once per fingerprint; ``{"ckpt", *splits, "samples_per_s", "fingerprint"}`` (a retrieval
    tower's CTR scores are read on val only: no test number of it is reported)."""

    def train() -> dict:
        args = ["fit"] + [a for c in configs for a in ("--config", c)] + list(overrides)
        args += ["--data.path", data, "--seed_everything", str(seed), "--trainer.enable_progress_bar", "false"]
        args += ["--trainer.logger.init_args.save_dir", str(OUT), "--trainer.logger.init_args.name", ""]
        cli = run(args + ["--trainer.logger.init_args.version", version])
        meter = next(cb for cb in cli.trainer.callbacks if isinstance(cb, Throughput))
        ckpt = Path(cli.trainer.checkpoint_callback.best_model_path)
        scores = {}
        for split in splits:
            report = evaluate(ckpt, split=split, out=OUT / version / f"eval_{split}", bootstrap=0)
            scores[split] = {m: float(report[m]) for m in ("auc", "gauc")}
        rates = meter.rates[1:] or meter.rates
        return {"ckpt": str(ckpt), "samples_per_s": float(np.mean(rates)), **scores}

    texts = [Path(c).read_text() for c in configs]
    return reused_or_run(OUT / version, [texts, seed, prepared(data), *([list(overrides)] if overrides else [])], train)


def retrieve(name: str, runs: dict[str, dict], split: str, columns: list[str], depth: int = 100) -> dict:
    """``recsys retrieve`` at ``KS`` with the two-tower (and text head / DIN) of ``runs``; reused by fingerprint."""
    from recsys.commands.retrieve import main as retrieve_main

    out = OUT / "retrieval" / name
    args = ["--two-tower", runs["two_tower"]["ckpt"], "--split", split, "--k", *map(str, KS), "--out", str(out)]
    args += ["--rerank-depth", str(depth)]
    if "head" in runs:
        args += ["--text-head", runs["head"]["ckpt"]]
    if "hybrid" in runs:
        args += ["--hybrid-tower", runs["hybrid"]["ckpt"], "--cold-floor"]
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
    parser.add_argument("--data", default="data/ml100k-cold")
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    start = time.perf_counter()
    din, seeds, tag = "configs/movielens/din.yaml", args.seeds, Path(args.data).name
    dins = {"none": [fit(f"{tag}/din_s{s}", s, [din], args.data) for s in seeds]}
    for head in args.heads:
        text = f"configs/text/{head}.yaml"
        dins[head] = [fit(f"{tag}/din_text_{head}_s{s}", s, [din, text], args.data) for s in seeds]
    tower = ["configs/movielens/two_tower.yaml"]
    towers = [fit(f"{tag}/two_tower_s{s}", s, tower, args.data, splits=("val",)) for s in seeds]

    ctr = {
        h: {sp: {m: [r[sp][m] for r in runs] for m in ("auc", "gauc")} for sp in ("val", "test")}
        for h, runs in dins.items()
    }
    reranker = best_on_val(ctr, "auc")

    content = {}  # content head and text columns together, on val content Recall@K (mean over seeds)
    for head in args.heads:
        for label, columns in TEXT_COLUMNS.items():
            reports = [
                retrieve(f"{tag}/val_{head}_{label}_s{s}", {"two_tower": t, "head": d}, "val", columns)
                for s, t, d in zip(seeds, towers, dins[head], strict=True)
            ]
            content[(head, label)] = {"val": {"recall": [r["results"]["text"][f"recall@{K}"] for r in reports]}}
    head, label = best_on_val(content, "recall")
    columns = TEXT_COLUMNS[label]
    hybrids = {
        p: [fit(f"{tag}/hybrid_tower_d{p}_s{s}", s, HYBRID, args.data, _dropout(p), ("val",)) for s in seeds]
        for p in ID_DROPOUTS
    }
    dropouts = {}
    for p, runs in hybrids.items():
        reports = [
            retrieve(f"{tag}/val_hybrid_d{p}_s{s}", {"two_tower": t, "head": d, "hybrid": y}, "val", columns)
            for s, t, d, y in zip(seeds, towers, dins[head], runs, strict=True)
        ]
        dropouts[p] = {"val": {"recall": [r["results"]["hybrid_learned"][f"recall@{K}"] for r in reports]}}
    dropout = best_on_val(dropouts, "recall")
    hybrid_towers = hybrids[dropout]
    depths = {}
    for depth in DEPTHS:
        reports = [
            retrieve(
                f"{tag}/val_depth{depth}_s{s}",
                {"two_tower": t, "head": d, "hybrid": y, "din": r},
                "val",
                columns,
                depth,
            )
            for s, t, d, y, r in zip(seeds, towers, dins[head], hybrid_towers, dins[reranker], strict=True)
        ]
        depths[depth] = {"val": {"recall": [r["results"]["hybrid_learned+din"][f"recall@{K}"] for r in reports]}}
    depth = best_on_val(depths, "recall")
    content_test = {
        h: [
            retrieve(f"{tag}/test_{h}_{label}_s{s}", {"two_tower": t, "head": d}, "test", columns)["results"]["text"]
            for s, t, d in zip(seeds, towers, dins[h], strict=True)
        ]
        for h in args.heads
    }
    hybrid = [
        retrieve(f"{tag}/hybrid_s{s}", {"two_tower": t, "head": d, "hybrid": y, "din": r}, "test", columns, depth)
        for s, t, d, y, r in zip(seeds, towers, dins[head], hybrid_towers, dins[reranker], strict=True)
    ]
    results = {
        "data": args.data,
        "ctr": ctr,
        "samples_per_s": {h: [r["samples_per_s"] for r in runs] for h, runs in dins.items()},
        "chosen": {
            "reranker": reranker,
            "content_head": head,
            "text_columns": label,
            "id_dropout": dropout,
            "rerank_depth": depth,
        },
        "content_val": {f"{h} / {c}": v for (h, c), v in content.items()},
        "id_dropout_val": dropouts,
        "depth_val": depths,
        "retrieval": hybrid,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    text_md = markdown(args, results, content_test, time.perf_counter() - start)
    print(text_md)
    if not args.no_doc:
        write_doc_section("docs/benchmarks.md", "bench_text", text_md)


def _val_means(choices: dict) -> str:
    return ", ".join(f"{key}: {np.mean(v['val']['recall']):.4f}" for key, v in choices.items())


def _dropout(share: float) -> tuple[str, str]:
    return ("--model.init_args.item_id_dropout", str(share))


def mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.4f} ± {np.std(values):.4f}"


def _paired(hybrid: list[dict], a: str, b: str, key: str) -> str:
    """``a − b`` of per-user ``key`` averaged over seeds: the mean and its paired bootstrap 95% interval."""
    x = np.mean([np.array(r["results"][a][key]) for r in hybrid], axis=0)
    y = np.mean([np.array(r["results"][b][key]) for r in hybrid], axis=0)
    low, high = paired_bootstrap_interval(x, y)
    return f"{(x - y).mean():+.4f} [{low:+.4f}, {high:+.4f}] ({len(x)} users)"


def markdown(args: argparse.Namespace, results: dict, content_test: dict, seconds: float) -> str:
    ctr, hybrid, chosen = results["ctr"], results["retrieval"], results["chosen"]
    none = np.array(ctr["none"]["test"]["auc"])
    first = hybrid[0]
    lines = [
        f"`python scripts/bench_text.py --data {args.data} --heads {' '.join(args.heads)} --seeds "
        f"{' '.join(map(str, args.seeds))}` — {machine()}; {seconds / 60:.0f} min (runs under runs/bench_text are "
        f"reused when their fingerprint matches). Data `{args.data}`; item text = movie title through "
        "all-MiniLM-L6-v2 (frozen, offline). DIN = `configs/movielens/din.yaml`, with text `--config "
        "configs/text/<head>.yaml` (title vector projected to 4 and joined to the item ID embedding of the target "
        f"and every behavior). Mean ± std over seeds {args.seeds}; every choice made on val (`recsys.eval.selection`). "
        "Content retrieval: each item's text through the head as that seed's DIN run learned it; user = mean of their "
        f"train clicks' vectors, cosine, items seen in train excluded; {first['users']} test users.",
        "",
        "| item text in DIN | DIN val AUC | DIN test AUC | test GAUC | Δ test AUC vs none | DIN samples/s | "
        f"content Recall@{K} | content cold-item Recall@{K} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ["none", *args.heads]:
        aucs, rate = np.array(ctr[name]["test"]["auc"]), np.median(results["samples_per_s"][name])
        runs = content_test.get(name, [])
        retrieval = (
            f"{mean_std([r[f'recall@{K}'] for r in runs])} | {mean_std([r[f'cold_recall@{K}'] for r in runs])}"
            if runs
            else "— | —"
        )
        lines.append(
            f"| {name} | {mean_std(ctr[name]['val']['auc'])} | {mean_std(aucs)} | "
            f"{mean_std(ctr[name]['test']['gauc'])} | {aucs.mean() - none.mean():+.4f} | {rate:,.0f} | {retrieval} |"
        )
    lines += [
        "",
        f"Retrieval on the test split ({first['catalogue']} items, {first['cold_items']} cold; "
        f"{first['results']['id']['cold_users']} users with a cold positive), one two-tower and one hybrid tower "
        "per seed (`configs/text/hybrid_tower.yaml`: title vectors, mean head, projected to 16, in the item tower; "
        "in training a share of the clicked rows read the OOV row instead of their item's ID row, so a cold item "
        "— OOV row ⊕ its title — is placed by its text). `hybrid_tower` is that tower alone; `hybrid_learned` "
        "keeps the tower's z-score for warm items and blends it with content's for cold ones, "
        "α·z(tower) + (1 − α)·z(content), α chosen on val per seed: the best val Recall@50 among the α "
        "whose val cold-item Recall@50 is at least content-only's (`recsys retrieve --cold-floor`). Chosen on val: "
        f"content head `{chosen['content_head']}` with text `{chosen['text_columns']}`, the hybrid tower's ID dropout "
        f"{chosen['id_dropout']} (of {ID_DROPOUTS}; mean val Recall@{K} of the learned hybrid "
        f"{_val_means(results['id_dropout_val'])}), DIN re-ranker `{chosen['reranker']}` (best mean val AUC), re-rank "
        f"depth {chosen['rerank_depth']} (of {DEPTHS}), α per seed {[r['alpha'] for r in hybrid]}.",
        "",
        "| retrieval | " + " | ".join(f"Recall@{k} | NDCG@{k}" for k in KS) + f" | cold Recall@{K} | warm Recall@{K} |",
        "|---|" + "---:|" * (2 * len(KS) + 2),
    ]
    for name in first["results"]:
        runs = [r["results"][name] for r in hybrid]
        cells = [mean_std([m[f"{what}@{k}"] for m in runs]) for k in KS for what in ("recall", "ndcg")]
        cells += [mean_std([m[f"{where}_recall@{K}"] for m in runs]) for where in ("cold", "warm")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Paired differences of per-user Recall@{K} (averaged over seeds), bootstrap over users (2,000 draws), 95%:",
        "",
        f"- learned hybrid − ID, all users: {_paired(hybrid, 'hybrid_learned', 'id', f'user_recall@{K}')}",
        f"- learned hybrid − content, all users: {_paired(hybrid, 'hybrid_learned', 'text', f'user_recall@{K}')}",
        f"- learned hybrid − content, cold positives: "
        f"{_paired(hybrid, 'hybrid_learned', 'text', f'user_cold_recall@{K}')}",
        f"- learned hybrid − ID, warm positives: {_paired(hybrid, 'hybrid_learned', 'id', f'user_warm_recall@{K}')}",
        f"- hybrid + DIN − learned hybrid, all users: "
        f"{_paired(hybrid, 'hybrid_learned+din', 'hybrid_learned', f'user_recall@{K}')}",
    ]
    missing = [h for h in HEADS if h not in args.heads]
    if missing:
        lines += ["", f"Not run in this invocation (no number here): {', '.join(f'`{h}`' for h in missing)}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
