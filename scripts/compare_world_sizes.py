"""Same config, same seeds, on 1 and on N processes with the torchrec strategy: test metrics side by side.

    python scripts/compare_world_sizes.py --config configs/movielens/din.yaml --world-sizes 1 2 --seeds 1 2 3

Each run is `recsys fit ... --trainer.strategy torchrec --trainer.devices W` (per-rank batch from the
config, so the global batch grows with W) followed by `recsys eval` of its best-val checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from benchdoc import machine, write_doc_section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/movielens/din.yaml")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", type=Path, default=Path("runs/world_sizes"))
    parser.add_argument("--doc", default="docs/benchmarks.md")
    args = parser.parse_args()
    recsys = str(Path(sys.executable).parent / "recsys")
    name = Path(args.config).stem
    rows = []
    for world in args.world_sizes:
        for seed in args.seeds:
            report, seconds = fit_and_eval(recsys, args, name, world, seed)
            rows.append((world, seed, report, seconds))
            print(
                f"[world sizes] {world} seed {seed}: test AUC {report['auc']:.4f} GAUC {report['gauc']:.4f} "
                f"({seconds:.0f} s)",
                flush=True,
            )
    md = [
        f"## Same config on 1 and {' and '.join(str(w) for w in args.world_sizes[1:])} "
        "processes (`scripts/compare_world_sizes.py`)",
        "",
        f"Command: `python scripts/compare_world_sizes.py --config {args.config} --world-sizes "
        f"{' '.join(map(str, args.world_sizes))} --seeds {' '.join(map(str, args.seeds))}`  ",
        f"Machine: {machine()}; `--trainer.strategy torchrec` (DMP, gloo), per-rank batch from the config; "
        f"mean ± std over seeds {args.seeds}; Δ = paired by seed, vs {args.world_sizes[0]} process(es); "
        f"{time.strftime('%Y-%m-%d')}.",
        "",
        "| processes | test AUC | test GAUC | logloss | ΔAUC vs first (mean ± std of pairs) | fit wall time (median) |",
        "|---|---|---|---|---|---|",
    ]
    first = {seed: report["auc"] for world, seed, report, _ in rows if world == args.world_sizes[0]}
    for world in args.world_sizes:
        runs = [(seed, report, seconds) for w, seed, report, seconds in rows if w == world]
        auc, gauc, loss = ([r[m] for _, r, _ in runs] for m in ("auc", "gauc", "logloss"))
        delta = [r["auc"] - first[seed] for seed, r, _ in runs]
        md.append(
            f"| {world} | {np.mean(auc):.4f} ± {np.std(auc):.4f} | {np.mean(gauc):.4f} ± {np.std(gauc):.4f} | "
            f"{np.mean(loss):.4f} ± {np.std(loss):.4f} | {np.mean(delta):+.4f} ± {np.std(delta):.4f} | "
            f"{np.median([s for _, _, s in runs]):.0f} s |"
        )
    write_doc_section(Path(args.doc), f"world_sizes_{Path(args.config).stem}", "\n".join(md))
    print("\n".join(md))


def fit_and_eval(recsys: str, args: argparse.Namespace, name: str, world: int, seed: int) -> tuple[dict, float]:
    """``recsys fit`` at ``world`` processes and ``seed``, then ``recsys eval`` on test: (report, fit seconds)."""
    version = f"{name}_w{world}_s{seed}"
    shutil.rmtree(args.out / version, ignore_errors=True)
    start = time.perf_counter()
    fit = subprocess.run(
        [
            recsys,
            "fit",
            "--config",
            args.config,
            "--seed_everything",
            str(seed),
            "--trainer.strategy",
            "torchrec",
            "--trainer.devices",
            str(world),
            "--trainer.logger.init_args.save_dir",
            str(args.out),
            "--trainer.logger.init_args.name",
            "",
            "--trainer.logger.init_args.version",
            version,
            "--trainer.enable_progress_bar",
            "false",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // world))},
    )
    seconds = time.perf_counter() - start
    if fit.returncode != 0:
        sys.exit(f"fit at world size {world}, seed {seed} failed:\n{(fit.stdout + fit.stderr)[-3000:]}")
    ckpt = args.out / version / "checkpoints" / "best.ckpt"
    report_dir = args.out / version / "eval_test"
    subprocess.run([recsys, "eval", "--ckpt", str(ckpt), "--out", str(report_dir), "--bootstrap", "0"], check=True)
    return json.loads((report_dir / "report.json").read_text()), seconds


if __name__ == "__main__":
    main()
