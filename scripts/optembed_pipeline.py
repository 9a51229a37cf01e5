"""OptEmbed end to end: supernet → evolutionary search → compact retrain → test report.

    python scripts/optembed_pipeline.py                                   # ml100k-ctr, seed 1, budget 0.5
    python scripts/optembed_pipeline.py --data data/synthetic-sweep --out runs/optembed/synthetic/s1 \\
        --seed 1 --budget 0.5 -- --trainer.max_epochs 2 --data.batch_size 2048

Each stage writes its artifact under ``--out`` and is skipped when that artifact exists, so a
rerun after a crash or Ctrl-C resumes at the first unfinished stage (a stage interrupted
half-way is rerun from its start):

    supernet/DONE               supernet/checkpoints/best.ckpt  (stage 1: recsys fit ... optembed_supernet.yaml)
    budget_B/search/search.json search/optembed.pt, pareto.*    (stage 2: recsys optembed search --budget B)
    budget_B/retrain/DONE       retrain/checkpoints/best.ckpt   (stage 3: recsys fit ... optembed_retrain.yaml)
    budget_B/retrain/eval_test/report.json                      (test AUC/GAUC of the compact model)
    budget_B/result.json                                        (the summary printed at the end)

One supernet serves every budget: rerun with another ``--budget`` and only stages 2-3 run.

Arguments after ``--`` go to both ``recsys fit`` runs (epochs, batch size, lr, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from recsys.eval.report import evaluate
from recsys.train.cli import run
from recsys.train.optembed import SearchConfig, search

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "movielens"


def fit(data: str, out: Path, version: str, seed: int, configs: list[str], extra: list[str]) -> Path:
    """``recsys fit`` into ``out/version``; returns its best checkpoint."""
    args = ["fit", "--config", str(CONFIGS / "base.yaml")]
    for config in configs:
        args += ["--config", config]
    args += ["--data.path", data, "--seed_everything", str(seed), "--trainer.enable_progress_bar", "false",
             "--trainer.logger.init_args.save_dir", str(out), "--trainer.logger.init_args.name", "",
             "--trainer.logger.init_args.version", version, *extra]
    run(args)
    return out / version / "checkpoints" / "best.ckpt"


def pipeline(data: str, out: Path, seed: int, budget: float | None, extra: list[str],
             search_config: SearchConfig | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    supernet = out / "supernet" / "checkpoints" / "best.ckpt"
    if not (out / "supernet" / "DONE").exists():
        fit(data, out, "supernet", seed, [str(CONFIGS / "optembed_supernet.yaml")], extra)
        (out / "supernet" / "DONE").touch()
    out = out / f"budget_{budget if budget else 'none'}"
    if not (out / "search" / "search.json").exists():
        config = search_config or SearchConfig()
        config.budget, config.seed = budget, seed
        search(supernet, out / "search", config)
    found = json.loads((out / "search" / "search.json").read_text())
    compact = out / "retrain" / "checkpoints" / "best.ckpt"
    if not (out / "retrain" / "DONE").exists():
        fit(data, out, "retrain", seed, [str(CONFIGS / "optembed_retrain.yaml")],
            ["--model.init_args.optembed.artifact", str(out / "search"), *extra])
        (out / "retrain" / "DONE").touch()
    report_file = out / "retrain" / "eval_test" / "report.json"
    if not report_file.exists():
        evaluate(compact, split="test", out=report_file.parent, bootstrap=0)
    report = json.loads(report_file.read_text())
    result = {
        "data": data, "seed": seed, "budget": budget,
        "test_auc": report["auc"], "test_gauc": report["gauc"],
        "sparsity": found["sparsity"], "row_sparsity": found["row_sparsity"],
        "params": found["params"], "full_params": found["full_params"],
        "search_val_auc": found["val_auc"], "supernet_val_auc": found["full_dims_val_auc"],
        "dims": found["dims"], "kept_rows": found["kept_rows"], "checkpoint": str(compact),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/ml100k-ctr", help="dataset directory")
    parser.add_argument("--out", default="runs/optembed/ml100k/s1", help="pipeline directory (resumes if it exists)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--budget", type=float, default=0.5,
                        help="max embedding parameters as a fraction of the full tables' (search); 0 = none")
    args = parser.parse_args(argv)
    result = pipeline(args.data, Path(args.out), args.seed, args.budget or None, extra)
    print(json.dumps({k: v for k, v in result.items() if k not in ("dims", "kept_rows")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
