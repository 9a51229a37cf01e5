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
from benchdoc import data_identity, machine, reused_or_run, write_doc_section

from recsys.data.vocab import Vocabulary
from recsys.embedding.optembed import ARTIFACT, load_artifact
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
FULL_DIM = 16  # the base config's width (configs/movielens/base.yaml)


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


def fit_and_test(
    data: str, root: Path, version: str, seed: int, block: dict | None, extra: list[str], inputs: str = ""
) -> float:
    """Test AUC of the base model with embedding ``block`` (None: the config's), reused when the run
    directory holds a result for the same config text, block, seed, options and ``inputs`` (a hash of
    the files the block names)."""
    options = [*(["--model.init_args.embedding", json.dumps(block)] if block else []), *extra]
    parts = [Path(BASE).read_text(), data, data_identity(data), seed, options, inputs]
    return reused_or_run(root / version, parts, lambda: {"auc": test_auc(fit(data, root, version, seed, options))})[
        "auc"
    ]


def ablation_artifact(search_dir: str, out: Path, keep_rows: bool, keep_dims: bool) -> Path:
    """A search artifact with one part of OptEmbed switched off: the searched row masks with every table
    at its full width (``keep_rows``, OptEmbed-E), or every row with the searched widths (``keep_dims``,
    OptEmbed-D); written to ``out`` for a compact retrain."""
    artifact = load_artifact(search_dir)
    derived = {
        **artifact,
        "kept": artifact["kept"] if keep_rows else {o: torch.ones_like(m) for o, m in artifact["kept"].items()},
        "dims": artifact["dims"] if keep_dims else dict(artifact["full_dims"]),
    }
    out.mkdir(parents=True, exist_ok=True)
    torch.save(derived, out / ARTIFACT)
    return out


def row(name: str, method: str, budget: float, seed: int, params: int, full_params: int, auc: float) -> dict:
    return {
        "dataset": name,
        "method": method,
        "budget": budget,
        "seed": seed,
        "params": params,
        "full_params": full_params,
        "sparsity": 1 - params / full_params,
        "test_auc": auc,
    }


def run_seed(name: str, seed: int, budgets: list[float]) -> list[dict]:
    """Per seed: the full tables, OptEmbed per budget, and at each budget's parameters the baselines
    (unified, uniform narrow tables) and the ablations (rows only, widths only)."""
    data, extra = DATASETS[name]["path"], DATASETS[name]["extra"]
    root = OUT / name / f"s{seed}"
    sizes = Vocabulary.load_or_build(Path(data)).table_sizes()
    rows = []
    for budget in budgets:
        result = pipeline(data, root, seed, budget, extra)
        full_params = result["full_params"]
        rows.append(row(name, "optembed", budget, seed, result["params"], full_params, result["test_auc"]))
        unified_rows = max(1, round(result["params"] / 8))
        block = {"kind": "unified", "rows": unified_rows, "dim": 8, "num_tables": 1, "probes": 2}
        auc = fit_and_test(data, root, f"unified_b{budget}", seed, block, extra)
        rows.append(row(name, "unified", budget, seed, unified_rows * 8, full_params, auc))
        narrow = max(4, round(FULL_DIM * budget / 4) * 4)  # uniform width at the budget (FBGEMM: multiples of 4)
        auc = fit_and_test(data, root, f"narrow_d{narrow}", seed, {"dim": narrow}, extra)
        rows.append(row(name, f"uniform dim {narrow}", budget, seed, sum(sizes.values()) * narrow, full_params, auc))
        for method, keep_rows, keep_dims in (("rows only", True, False), ("widths only", False, True)):
            if method == "rows only" and budget != budgets[0]:
                continue  # the row masks come from the supernet: one per seed, whatever the budget
            label = method.replace(" ", "_") + ("" if keep_rows and not keep_dims else f"_b{budget}")
            artifact = ablation_artifact(result["search"], root / "artifacts" / label, keep_rows, keep_dims)
            found = load_artifact(artifact)
            params = sum(int(found["kept"][o].sum()) * int(found["dims"][o]) for o in found["dims"])
            compact = {"kind": "optembed", "stage": "compact", "dim": FULL_DIM, "artifact": str(artifact)}
            inputs = method + (Path(result["search"]) / "search.json").read_text()  # what the artifact derives from
            auc = fit_and_test(data, root, label, seed, compact, extra, inputs)
            rows.append(row(name, f"optembed {method}", budget if keep_dims else 1.0, seed, params, full_params, auc))
    auc = fit_and_test(data, root, "full", seed, None, extra)
    rows.append(row(name, "full", 1.0, seed, full_params, full_params, auc))
    return rows


def markdown(rows: list[dict], command: str, seconds: float) -> str:
    lines = [
        f"`{command}` — {machine()}, {torch.get_num_threads()} torch threads, "
        f"{seconds / 60:.0f} min (finished runs under runs/optembed are reused when their fingerprint matches). "
        "Test AUC mean ± std over seeds; sparsity = 1 − Σ kept_rows·dims / Σ rows·16 "
        "(docs/protocols.md), mean over seeds; Δ = vs the full tables "
        "of the same seeds. Supernet α = 1e-5, threshold lr 1e-2; "
        "search: dims in multiples of 4, population 50, 30 generations × "
        "(10 mutations + 10 crossovers), top 15, p = 0.1, fitness = val AUC. Baselines at each budget's "
        "parameters: `unified` (one shared table, 2 probes × 8, as many parameters as that seed's OptEmbed "
        "tables), `uniform dim d` (plain tables, every feature at width d = 16·budget rounded to a multiple of 4, "
        "at least 4). Ablations (compact retrains from a derived search artifact): `optembed rows "
        "only` = the supernet's row masks with every table at width 16 (OptEmbed-E), `optembed widths only` = "
        "every row with the searched widths (OptEmbed-D).",
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
    lines += ["", *contributions(rows)]
    lines += [
        "",
        "Search front of the ml100k seed-1 supernet at budget 0.5 (val AUC with supernet weights):",
        "",
        "![OptEmbed search](optembed_pareto.png)",
    ]
    return "\n".join(lines)


def contributions(rows: list[dict]) -> list[str]:
    """One sentence per dataset and budget, computed from the rows: what row pruning and the widths
    search each add, in test AUC (mean over seeds), against the uniform table of that budget."""

    def mean(name: str, method: str, budget: float, key: str = "test_auc") -> float | None:
        values = [r[key] for r in rows if (r["dataset"], r["method"], r["budget"]) == (name, method, budget)]
        return float(np.mean(values)) if values else None

    lines = []
    for name in dict.fromkeys(r["dataset"] for r in rows):
        full, rows_only = mean(name, "full", 1.0), mean(name, "optembed rows only", 1.0)
        budgets = sorted({r["budget"] for r in rows if r["dataset"] == name and r["method"] == "optembed"})
        for budget in budgets[::-1]:
            uniform = [
                r["test_auc"]
                for r in rows
                if r["dataset"] == name and r["budget"] == budget and r["method"].startswith("uniform")
            ]
            uniform = float(np.mean(uniform)) if uniform else None
            optembed, widths = mean(name, "optembed", budget), mean(name, "optembed widths only", budget)
            if None in (full, rows_only, uniform, optembed, widths):
                continue
            params = {m: mean(name, m, budget, "params") for m in ("optembed", "optembed widths only")}
            pruned = mean(name, "optembed rows only", 1.0, "params")
            uniform_params = next(
                r["params"]
                for r in rows
                if r["dataset"] == name and r["budget"] == budget and r["method"].startswith("uniform")
            )
            lines.append(
                f"- {name}, budget {budget:g}: OptEmbed ({params['optembed']:,.0f} parameters) "
                f"{optembed - uniform:+.4f} test AUC vs the uniform table ({uniform_params:,}); "
                f"the widths search with every row kept ({params['optembed widths only']:,.0f}) "
                f"{widths - uniform:+.4f}; row pruning alone, full widths ({pruned:,.0f}), "
                f"{rows_only - full:+.4f} vs the full tables."
            )
    return lines


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
    command = "python scripts/bench_optembed.py " + " ".join(
        f"--{k} {' '.join(map(str, v))}"
        for k, v in (("datasets", args.datasets), ("budgets", args.budgets), ("seeds", args.seeds))
    )
    text = markdown(rows, command, time.perf_counter() - start)
    print(text)
    pareto = OUT / "ml100k" / f"s{args.seeds[0]}" / "budget_0.5" / "search" / "pareto.png"
    if not args.no_doc:
        if pareto.exists():
            shutil.copy(pareto, "docs/optembed_pareto.png")
        write_doc_section("docs/benchmarks.md", "optembed", text)


if __name__ == "__main__":
    main()
