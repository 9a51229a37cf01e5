"""The same small grid for every model, chosen on val only: learning rate × mini-batch aware L2.

    python scripts/tune_models.py                                   # every model config of configs/movielens
    python scripts/tune_models.py --models base deepfm --lrs 0.001 0.003 --mba 0 0.01

Each model config trains once per grid point (seed ``--seed``) and is scored by the best val AUC
of the run (its checkpoint callback's); test is never read. Every model gets the same trials, the
base model included, so a comparison is not won by tuning one side more. Writes
runs/tune/results.json and the ``tuning`` block of docs/benchmarks.md (the grid, every val AUC,
the choice); the chosen values are then written into ``configs/movielens/<model>.yaml`` by hand.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
from benchdoc import machine, write_doc_section

from recsys.train.cli import run

MODELS = ["base", "din", "bst", "deepfm", "dcnv2", "finalmlp", "dlrm"]


def trial(model: str, lr: float, mba: float, seed: int, out: Path) -> float:
    """Best val AUC of one training run of ``configs/movielens/<model>.yaml`` with these values."""
    version = f"lr{lr}_mba{mba}_s{seed}"
    result = out / model / version / "val_auc.json"
    if result.exists():  # a finished trial of the same settings (its directory names them)
        return json.loads(result.read_text())["val_auc"]
    cli = run(
        [
            "fit",
            "--config",
            f"configs/movielens/{model}.yaml",
            "--seed_everything",
            str(seed),
            "--model.init_args.optimizer.init_args.lr",
            str(lr),
            "--model.init_args.mba_lambda",
            str(mba),
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.logger.init_args.save_dir",
            str(out),
            "--trainer.logger.init_args.name",
            model,
            "--trainer.logger.init_args.version",
            version,
        ]
    )
    best = float(cli.trainer.checkpoint_callback.best_model_score)
    result.write_text(json.dumps({"val_auc": best}))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--lrs", nargs="+", type=float, default=[0.001, 0.003])
    parser.add_argument("--mba", nargs="+", type=float, default=[0.0, 0.01], help="mba_lambda values")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/tune"))
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--note", default="", help="a sentence for the block: how the trials were run, what was reused")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    grid = list(itertools.product(args.lrs, args.mba))
    results = {
        m: {f"lr={lr}, mba_lambda={mba}": trial(m, lr, mba, args.seed, args.out) for lr, mba in grid}
        for m in args.models
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    points = list(next(iter(results.values())))
    lines = [
        f"`python scripts/tune_models.py --models {' '.join(args.models)} --lrs {' '.join(map(str, args.lrs))} "
        f"--mba {' '.join(map(str, args.mba))} --seed {args.seed}` — {machine()}, {args.threads} torch threads; "
        f"{time.strftime('%Y-%m-%d')}. Every model config gets the same {len(grid)} "
        "trials (learning rate × mini-batch aware L2), each scored by its best val AUC (seed "
        f"{args.seed}); test is not read. The best point goes into `configs/movielens/<model>.yaml`."
        + (f" {args.note}" if args.note else ""),
        "",
        "| model | " + " | ".join(points) + " | chosen |",
        "|---|" + "---:|" * len(points) + "---|",
    ]
    for model, scores in results.items():
        best = max(scores, key=scores.get)
        lines.append(f"| {model} | " + " | ".join(f"{scores[p]:.4f}" for p in points) + f" | {best} |")
    text = "\n".join(lines)
    print(text)
    if not args.no_doc:
        write_doc_section("docs/benchmarks.md", "tuning", text)


if __name__ == "__main__":
    main()
