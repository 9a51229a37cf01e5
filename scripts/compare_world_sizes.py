"""Same config, same seed, on 1 and on N processes with the torchrec strategy: test metrics side by side.

    python scripts/compare_world_sizes.py --config configs/movielens/din.yaml --world-sizes 1 2

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

from benchdoc import machine, write_doc_section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/movielens/din.yaml")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=Path("runs/world_sizes"))
    parser.add_argument("--doc", default="docs/benchmarks.md")
    args = parser.parse_args()
    recsys = str(Path(sys.executable).parent / "recsys")
    name = Path(args.config).stem
    rows = []
    for world in args.world_sizes:
        version = f"{name}_w{world}"
        shutil.rmtree(args.out / version, ignore_errors=True)
        start = time.perf_counter()
        fit = subprocess.run(
            [
                recsys,
                "fit",
                "--config",
                args.config,
                "--seed_everything",
                str(args.seed),
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
            sys.exit(f"fit at world size {world} failed:\n{(fit.stdout + fit.stderr)[-3000:]}")
        ckpt = args.out / version / "checkpoints" / "best.ckpt"
        report_dir = args.out / version / "eval_test"
        subprocess.run(
            [recsys, "eval", "--ckpt", str(ckpt), "--out", str(report_dir), "--bootstrap", "500"], check=True
        )
        report = json.loads((report_dir / "report.json").read_text())
        rows.append((world, report, seconds))
        print(
            f"[world sizes] {world}: test AUC {report['auc']:.4f} GAUC {report['gauc']:.4f} ({seconds:.0f} s)",
            flush=True,
        )
    first = rows[0][1]
    md = [
        f"## Same config on 1 and {' and '.join(str(w) for w, _, _ in rows[1:])} "
        "processes (`scripts/compare_world_sizes.py`)",
        "",
        f"Command: `python scripts/compare_world_sizes.py --config {args.config} --world-sizes "
        f"{' '.join(map(str, args.world_sizes))} --seed {args.seed}`  ",
        f"Machine: {machine()}; `--trainer.strategy torchrec` (DMP, gloo), per-rank batch from the config; "
        f"seed {args.seed}; {time.strftime('%Y-%m-%d')}.",
        "",
        "| processes | test AUC | test GAUC | logloss | ΔAUC vs first | fit wall time |",
        "|---|---|---|---|---|---|",
    ]
    for world, report, seconds in rows:
        md.append(
            f"| {world} | {report['auc']:.4f} | {report['gauc']:.4f} | {report['logloss']:.4f} | "
            f"{report['auc'] - first['auc']:+.4f} | {seconds:.0f} s |"
        )
    write_doc_section(Path(args.doc), f"world_sizes_{Path(args.config).stem}", "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
