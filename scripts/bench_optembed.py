"""OptEmbed sparsity vs test AUC, against the full tables and Unified Embedding at equal parameters.

    python scripts/bench_optembed.py                   # ml100k + synthetic, budgets 0.5 0.25, seeds 1 2 3
    python scripts/bench_optembed.py --datasets ml100k --budgets 0.5 --seeds 1

Per dataset and seed: the full per-feature tables (Embedding&MLP, ``configs/movielens/base.yaml``);
one OptEmbed supernet, then search + compact retrain per budget (``recsys optembed run``);
Unified Embedding (one shared table, 2 probes × 8 dims, width 16 per feature as in
``scripts/sweep_memory.py``) with as many parameters as that seed's compact tables.
Writes runs/optembed/results.csv, docs/optembed_pareto.png (the ml100k seed-1 search) and the
``optembed`` block of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from benchdoc import machine, write_doc_section

from recsys.eval.report import evaluate
from recsys.train.cli import run
from recsys.train.optembed import search_arguments
from recsys.train.optembed_run import pipeline as optembed_pipeline

DATASETS = {
    "ml100k": {"path": "data/ml100k-ctr", "extra": []},
    "synthetic": {"path": "data/synthetic-sweep", "extra": ["--trainer.max_epochs", "2", "--data.batch_size", "2048"]},
}
OUT = Path("runs/optembed")


BASE = "configs/movielens/base.yaml"


def fit(data: str, root: Path, version: str, seed: int, extra: list[str]) -> Path:
    """The base model (``configs/movielens/base.yaml``) into ``root/version``; its best checkpoint."""
    run(
        [
            "fit",
            "--config",
            BASE,
            "--data.path",
            data,
            "--seed_everything",
            str(seed),
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.logger.init_args.save_dir",
            str(root),
            "--trainer.logger.init_args.name",
            "",
            "--trainer.logger.init_args.version",
            version,
            *extra,
        ]
    )
    return root / version / "checkpoints" / "best.ckpt"


def pipeline(data: str, root: Path, seed: int, budget: float, extra: list[str]) -> dict:
    """``recsys optembed run`` on the base model: one supernet per seed, a search and a compact retrain per budget."""
    search = search_arguments(seed, budget)
    configs = [BASE, "configs/embedding/optembed_supernet.yaml"]
    return optembed_pipeline(
        configs, root / "optembed", search, ["--data.path", data, "--seed_everything", str(seed), *extra]
    )


def test_auc(ckpt: Path) -> float:
    return float(evaluate(ckpt, split="test", out=ckpt.parent.parent / "eval_test", bootstrap=0)["auc"])


def run_seed(name: str, seed: int, budgets: list[float]) -> list[dict]:
    data, extra = DATASETS[name]["path"], DATASETS[name]["extra"]
    root = OUT / name / f"s{seed}"
    rows = []
    full_ckpt = root / "full" / "checkpoints" / "best.ckpt"
    if not (root / "full" / "eval_test" / "report.json").exists():
        shutil.rmtree(root / "full", ignore_errors=True)
        fit(data, root, "full", seed, extra)
        test_auc(full_ckpt)
    full = json.loads((root / "full" / "eval_test" / "report.json").read_text())
    for budget in budgets:
        result = pipeline(data, root, seed, budget, extra)
        rows.append(
            {
                "dataset": name,
                "method": "optembed",
                "budget": budget,
                "seed": seed,
                "params": result["params"],
                "full_params": result["full_params"],
                "sparsity": result["sparsity"],
                "test_auc": result["test_auc"],
            }
        )
        unified_rows = max(1, round(result["params"] / 8))
        version = f"unified_b{budget}"
        report = root / version / "eval_test" / "report.json"
        if not report.exists():
            shutil.rmtree(root / version, ignore_errors=True)
            block = {"kind": "unified", "rows": unified_rows, "dim": 8, "num_tables": 1, "probes": 2}
            test_auc(fit(data, root, version, seed, ["--model.init_args.embedding", json.dumps(block), *extra]))
        rows.append(
            {
                "dataset": name,
                "method": "unified",
                "budget": budget,
                "seed": seed,
                "params": unified_rows * 8,
                "full_params": result["full_params"],
                "sparsity": 1 - unified_rows * 8 / result["full_params"],
                "test_auc": json.loads(report.read_text())["auc"],
            }
        )
    rows.append(
        {
            "dataset": name,
            "method": "full",
            "budget": 1.0,
            "seed": seed,
            "params": rows[0]["full_params"],
            "full_params": rows[0]["full_params"],
            "sparsity": 0.0,
            "test_auc": full["auc"],
        }
    )
    return rows


def markdown(rows: list[dict], seeds: list[int], seconds: float) -> str:
    lines = [
        f"`python scripts/bench_optembed.py` — {machine()}, {torch.get_num_threads()} torch threads, seeds {seeds}, "
        f"{seconds / 60:.0f} min. Test AUC mean ± std over seeds; sparsity = 1 − Σ kept_rows·dims / Σ rows·16 "
        "(docs/protocols.md), mean over seeds; Δ = vs the full tables "
        "of the same seeds. Supernet α = 1e-5, threshold lr 1e-2; "
        "search: dims in multiples of 4, population 50, 30 generations × "
        "(10 mutations + 10 crossovers), top 15, p = 0.1, fitness = val AUC.",
        "",
        "| dataset | method | budget | sparsity | embedding params | test AUC | Δ AUC vs full |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in dict.fromkeys(r["dataset"] for r in rows):
        full = np.array([r["test_auc"] for r in rows if r["dataset"] == name and r["method"] == "full"])
        keys = dict.fromkeys((r["method"], r["budget"]) for r in rows if r["dataset"] == name)
        for method, budget in sorted(keys, key=lambda k: (-k[1], k[0] != "optembed")):
            sel = [r for r in rows if r["dataset"] == name and r["method"] == method and r["budget"] == budget]
            aucs = np.array([r["test_auc"] for r in sel])
            lines.append(
                f"| {name} | {method} | {budget:g} | {np.mean([r['sparsity'] for r in sel]):.1%} | "
                f"{np.mean([r['params'] for r in sel]):,.0f} | {aucs.mean():.4f} ± {aucs.std():.4f} | "
                f"{aucs.mean() - full.mean():+.4f} |"
            )
    lines += [
        "",
        "Search front of the ml100k seed-1 supernet at budget 0.5 (val AUC with supernet weights):",
        "",
        "![OptEmbed search](optembed_pareto.png)",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.25])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    args = parser.parse_args()
    if "synthetic" in args.datasets and not Path(DATASETS["synthetic"]["path"], "GENERATED.json").exists():
        from sweep_memory import ensure_synthetic  # same 400k-row data as the memory sweep

        ensure_synthetic(Path(DATASETS["synthetic"]["path"]))
    start = time.perf_counter()
    rows = [r for name in args.datasets for seed in args.seeds for r in run_seed(name, seed, args.budgets)]
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    text = markdown(rows, args.seeds, time.perf_counter() - start)
    print(text)
    pareto = OUT / "ml100k" / f"s{args.seeds[0]}" / "budget_0.5" / "search" / "pareto.png"
    if not args.no_doc:
        if pareto.exists():
            shutil.copy(pareto, "docs/optembed_pareto.png")
        write_doc_section("docs/benchmarks.md", "optembed", text)


if __name__ == "__main__":
    main()
