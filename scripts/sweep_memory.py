"""Parameter budget vs test AUC: full per-feature tables, the per-feature hashing trick, and Unified
Embedding (one shared table, 2 probes per feature), over seeds, on ml100k-ctr and synthetic Criteo.

    python scripts/sweep_memory.py                                   # both datasets, 4 budgets, 3 seeds
    python scripts/sweep_memory.py --datasets ml100k --budgets 0.05 0.1 0.25 0.5 --seeds 1 2 3

At budget b the embedding parameters are b × the full tables' (Σ_f rows_f × 16):
hashing trick: ``embedding: {kind: hashed, dim: 16, budget: b}``, the embedding layer's one
allocation rule (max-min fair: a table smaller than the common cap keeps every row, the big ones
share the rest; recsys.embedding.spec); unified: one shared table of 2·b·Σ rows_f rows × 8 dims,
each feature concatenating 2 probes (width 16).
Writes runs/sweep_memory/results.csv, docs/sweep_memory.png and a block of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from benchdoc import data_identity, machine, reused_or_run, write_doc_section

from recsys.eval.report import evaluate
from recsys.train.cli import run

DIM = 16
PROBES = 2
DATASETS = {
    "ml100k": {"path": "data/ml100k-ctr", "extra": []},
    "synthetic": {"path": "data/synthetic-sweep", "extra": ["--trainer.max_epochs", "2", "--data.batch_size", "2048"]},
}


def ensure_synthetic(path: Path) -> None:
    if not (path / "GENERATED.json").exists():
        subprocess.run(
            [
                sys.executable,
                "datasets/synthetic/generate.py",
                "--rows",
                "400000",
                "--out",
                str(path),
                "--max-cardinality",
                "50000",
                "--seed",
                "0",
            ],
            check=True,
        )


def fit_and_score(data: str, method: str, block: dict, seed: int, out: Path, extra: list[str]) -> float:
    """Test AUC of the base model with embedding ``block``; a finished run of the same config text,
    block, seed and options is reused (its fingerprint in ``result.json``)."""
    version = f"{method}_s{seed}"
    parts = [Path("configs/movielens/base.yaml").read_text(), data, data_identity(data), block, seed, extra]
    return reused_or_run(out / version, parts, lambda: {"auc": _fit_and_score(data, version, block, seed, out, extra)})[
        "auc"
    ]


def _fit_and_score(data: str, version: str, block: dict, seed: int, out: Path, extra: list[str]) -> float:
    args = [
        "fit",
        "--config",
        "configs/movielens/base.yaml",
        "--data.path",
        data,
        "--seed_everything",
        str(seed),
        "--model.init_args.embedding",
        json.dumps(block),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger.init_args.save_dir",
        str(out),
        "--trainer.logger.init_args.name",
        "",
        "--trainer.logger.init_args.version",
        version,
        *extra,
    ]
    cli = run(args)
    report = evaluate(cli.trainer.checkpoint_callback.best_model_path, split="test", bootstrap=0)
    return float(report["auc"])


def embedding_parameters(block: dict, vocab) -> int:  # noqa: ANN001
    """Table parameters of an embedding block on a dataset (shared tables counted once)."""
    from recsys.embedding.spec import EmbeddingSpec

    plans = EmbeddingSpec.parse(block, vocab.schema).plans(vocab.schema, vocab.table_sizes())
    tables = {}
    for owner, plan in plans.items():
        for probe in range(plan.probes):
            name = (
                f"unified_{probe % EmbeddingSpec.parse(block, vocab.schema).num_tables}"
                if plan.kind == "unified"
                else owner
            )
            tables[name] = plan.rows * plan.dim
    return sum(tables.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.05, 0.1, 0.25, 0.5])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/sweep_memory"))
    parser.add_argument("--doc", default="docs/benchmarks.md")
    parser.add_argument(
        "--replot", action="store_true", help="only redraw the plot and re-render the block from the CSV (no training)"
    )
    args = parser.parse_args()
    if args.replot:  # the same run's numbers, redrawn and re-rendered (nothing trained)
        results = []
        with open(args.out / "results.csv") as handle:
            for row in csv.DictReader(handle):
                results.append(
                    (row["dataset"], row["method"], float(row["budget"]), int(row["params"]), 0, float(row["test_auc"]))
                )
        render(results, args, f"rendered from {args.out}/results.csv on {time.strftime('%Y-%m-%d')}")
        return
    torch.set_num_threads(args.threads)
    from recsys.data.vocab import Vocabulary

    started = time.time()
    results = []  # dataset, method, budget, params, seed, auc
    for name in args.datasets:
        path = Path(DATASETS[name]["path"])
        if name == "synthetic":
            ensure_synthetic(path)
        vocab = Vocabulary.load_or_build(path)
        sizes = vocab.table_sizes()
        full_rows = sum(sizes.values())
        extra = DATASETS[name]["extra"]
        for seed in args.seeds:
            auc = fit_and_score(str(path), "full", {"dim": DIM}, seed, args.out / name, extra)
            results.append((name, "full", 1.0, full_rows * DIM, seed, auc))
        for budget in args.budgets:
            hashed = {"kind": "hashed", "dim": DIM, "budget": budget}
            unified = {
                "kind": "unified",
                "rows": max(1, round(budget * full_rows * DIM / (DIM // PROBES))),
                "dim": DIM // PROBES,
                "probes": PROBES,
            }
            for method, spec in (("hashing", hashed), ("unified", unified)):
                params = embedding_parameters(spec, vocab)
                for seed in args.seeds:
                    auc = fit_and_score(str(path), f"{method}_{budget}", spec, seed, args.out / name, extra)
                    results.append((name, method, budget, params, seed, auc))
                    print(
                        f"[sweep] {name} {method} budget {budget} seed {seed}: params {params:,} test AUC {auc:.4f}",
                        flush=True,
                    )

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "results.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["dataset", "method", "budget", "params", "seed", "test_auc"])
        writer.writerows(results)
    render(
        results,
        args,
        f"{time.strftime('%Y-%m-%d')}, this invocation {time.time() - started:.0f} s (finished runs under "
        f"{args.out} are reused when their fingerprint matches)",
    )


def render(results: list[tuple], args: argparse.Namespace, when: str) -> None:
    """docs/sweep_memory.png and the ``sweep_memory`` block from ``(dataset, method, budget, params, seed, auc)``."""
    summary: dict = {}
    for name, method, budget, params, _, auc in results:
        summary.setdefault((name, method, budget, params), []).append(auc)
    plot(summary, Path("docs/sweep_memory.png"))
    lines = [
        "## Parameter budget vs test AUC: hashing trick vs Unified Embedding (`scripts/sweep_memory.py`)",
        "",
        f"Command: `python scripts/sweep_memory.py --datasets {' '.join(args.datasets)} --budgets "
        f"{' '.join(map(str, args.budgets))} --seeds {' '.join(map(str, args.seeds))}`  ",
        f"Machine: {machine()}, {args.threads} torch threads; base model (Embedding&MLP), width 16 per feature; "
        f"{when}. CSV: {args.out}/results.csv.",
        "",
        "Hashing trick: `embedding: {kind: hashed, dim: 16, budget: b}`, the embedding layer's one allocation "
        "rule (max-min fair: a table smaller than the common row cap keeps every row, the larger ones share "
        "what is left; `recsys/embedding/spec.py`), so small features are not collapsed to one row. "
        "Unified: one shared table of 2·b·Σ rows_f rows × 8, each feature concatenating 2 probes (width 16). "
        "Test AUC mean ± std over seeds.",
        "",
        "![Pareto front](sweep_memory.png)",
        "",
        "| dataset | budget | embedding params: hashing / unified | full tables | hashing trick | unified (2 probes) "
        "| unified − hashing |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in args.datasets:
        full = summary[next(k for k in summary if k[0] == name and k[1] == "full")]
        for budget in args.budgets:
            h_key = next(k for k in summary if k[:3] == (name, "hashing", budget))
            u_key = next(k for k in summary if k[:3] == (name, "unified", budget))
            h, u = summary[h_key], summary[u_key]
            lines.append(
                f"| {name} | {budget:.0%} | {h_key[3]:,} / {u_key[3]:,} | {np.mean(full):.4f} ± {np.std(full):.4f} | "
                f"{np.mean(h):.4f} ± {np.std(h):.4f} | {np.mean(u):.4f} ± {np.std(u):.4f} | "
                f"{np.mean(u) - np.mean(h):+.4f} |"
            )
    write_doc_section(Path(args.doc), "sweep_memory", "\n".join(lines))
    print("\n".join(lines))


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({k[0] for k in summary})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, name in zip(axes[0], datasets, strict=True):
        for method, marker in (("full", "*"), ("hashing", "o"), ("unified", "s")):
            keys = sorted((k for k in summary if k[0] == name and k[1] == method), key=lambda k: k[3])
            xs = [k[3] for k in keys]
            ys = [np.mean(summary[k]) for k in keys]
            es = [np.std(summary[k]) for k in keys]
            ax.errorbar(xs, ys, yerr=es, marker=marker, capsize=3, label=method)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("embedding parameters")
        ax.set_ylabel("test AUC (mean ± std over seeds)")
        ax.set_title(name)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
