"""recsys beside DeepCTR-Torch 0.3.0 on the same DIN task, timed in one invocation (an optional extra:
``make setup`` does not install DeepCTR; this script makes its virtual environment on first use).

    python scripts/bench_peers.py                      # 3 runs each side, alternating, 3 epochs
    python scripts/bench_peers.py --runs 1 --no-doc

Per run, alternating sides (a slow minute hits both):

- recsys: ``recsys fit --config configs/movielens/din.yaml`` as shipped (3 epochs, validation and
  checkpoints included), then ``recsys eval`` of the best checkpoint on test: two fresh processes,
  from the prepared dataset (``make data``), as ``scripts/bench_train.py`` runs them.
- DeepCTR-Torch: ``scripts/peers/deepctr_din.py`` in runs/bench_peers/venv (torch 2.13.0, the same
  build as ours), one fresh process: building the ml100k-ctr rows from the RecBole wheel, DIN trained
  3 epochs at batch 256 with the best-val epoch kept, then test predicted.

Each side's wall time is split into data preparation, training (validation included) and evaluation;
"start-up" is the rest of its processes' wall time (interpreter, imports, teardown). Median [min–max]
over the runs. Writes runs/bench_peers/results.json and the ``bench_peers`` block of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_train import one_run
from benchdoc import machine, publish, spread, write_doc_section
from checkouts import DATA, ROOT, environment

OUT = ROOT / "runs" / "bench_peers"
VENV = OUT / "venv"
# deepctr_torch imports requests (not in its declared requirements)
PEER = ["torch==2.13.0", "deepctr-torch==0.3.0", "scikit-learn", "pandas", "pyarrow", "tqdm", "requests"]
CONFIG = "configs/movielens/din.yaml"


def peer_python() -> Path:
    """The peer's interpreter, its environment made once (``rm -r runs/bench_peers/venv`` to remake)."""
    python = VENV / "bin" / "python"
    if not (VENV / ".installed").exists():
        print(f"[bench_peers] making {VENV} ({' '.join(PEER)}); once", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *PEER], check=True)
        (VENV / ".installed").touch()
    return python


def peer_run(python: Path, epochs: int, lr: float, out: Path) -> dict:
    start = time.perf_counter()
    cmd = [str(python), "scripts/peers/deepctr_din.py", "--work", str(out), "--epochs", str(epochs), "--lr", str(lr)]
    done = subprocess.run(cmd, cwd=ROOT, env=environment(), capture_output=True, text=True)
    wall = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    (out / "peer.log").write_text(done.stdout + done.stderr)
    if done.returncode:
        raise RuntimeError(f"the DeepCTR-Torch run failed (exit {done.returncode}); see {out / 'peer.log'}")
    r = json.loads(done.stdout.strip().splitlines()[-1])
    return r | {"total_s": wall, "startup_s": wall - r["prepare_s"] - r["train_s"] - r["eval_s"]}


def ours_run(epochs: int, out: Path) -> dict:
    r = one_run(ROOT, DATA, CONFIG, epochs, out)
    return {
        "prepare_s": 0.0,
        "train_s": r["fit_s"],
        "eval_s": r["eval_s"],
        "startup_s": 0.0,
        "total_s": r["total_s"],
        "test_auc": r["test_auc"],
        "samples_per_s": r["samples_per_s"],
    }


def markdown(results: dict, args: argparse.Namespace, load: float) -> str:
    ours, peer = results["recsys"], results["deepctr-torch"]
    ratio = [p["total_s"] / o["total_s"] for o, p in zip(ours, peer, strict=True)]
    # like for like: ours starts from prepared data, so their preparation left out too
    alike = [(p["total_s"] - p["prepare_s"]) / o["total_s"] for o, p in zip(ours, peer, strict=True)]
    lines = [
        "## recsys beside DeepCTR-Torch (`scripts/bench_peers.py`)",
        "",
        f"`python scripts/bench_peers.py --runs {args.runs} --epochs {args.epochs} --peer-lr {args.peer_lr}` — "
        f"{machine()}; OMP_NUM_THREADS={environment()['OMP_NUM_THREADS']}, load average {load:.2f} at the start; "
        f"{time.strftime('%Y-%m-%d')}. Median [min–max] of {args.runs} runs per side, the sides alternating. "
        "recsys: `recsys fit` of configs/movielens/din.yaml as shipped then `recsys eval` (two processes, from "
        "the prepared dataset; training = the fit's wall time, evaluation = the eval's, start-up included in "
        "both: —). "
        "DeepCTR-Torch 0.3.0: one process in its own venv (the same torch 2.13.0 build), its DIN with width "
        "16 and normalised attention like ours, Adam at the given lr, batch 256, best-val epoch kept; its "
        "data preparation builds the same ml100k-ctr rows from the RecBole wheel with our prepare.py, then "
        "its padded inputs.",
        "",
        "| side | data preparation | training | evaluation | start-up (rest) | total | test AUC |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, runs in results.items():
        cells = [
            spread([r[k] for r in runs], ".1f") + " s" if name != "recsys" or k in ("train_s", "eval_s") else "—"
            for k in ("prepare_s", "train_s", "eval_s", "startup_s")
        ]
        total = spread([r["total_s"] for r in runs], ".1f") + " s"
        lines.append(f"| {name} | {' | '.join(cells)} | {total} | {spread([r['test_auc'] for r in runs], '.4f')} |")
    lines += [
        "",
        f"DeepCTR-Torch's total over ours, run by run: {spread(ratio, '.2f')}× (the issue's target: ≥ 4×, at a "
        f"test AUC at least its own); without its data preparation (ours starts from prepared data): "
        f"{spread(alike, '.2f')}×.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--peer-lr", type=float, default=1e-3, help="DeepCTR's Adam learning rate")
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--render", action="store_true", help="rewrite the table from the last results.json")
    args = parser.parse_args()
    if args.render:
        saved = json.loads((OUT / "results.json").read_text())
        vars(args).update(saved.pop("args"))
        load = saved.pop("load")
        write_doc_section(ROOT / "docs" / "benchmarks.md", "bench_peers", markdown(saved, args, load))
        return
    if not (DATA / "PREPARED.json").exists():
        raise SystemExit(f"{DATA} is not prepared: run `make data` first")
    python = peer_python()
    load = os.getloadavg()[0]
    results: dict[str, list[dict]] = {"recsys": [], "deepctr-torch": []}
    for i in range(args.runs):
        results["recsys"].append(ours_run(args.epochs, OUT / "recsys" / f"run{i}"))
        results["deepctr-torch"].append(peer_run(python, args.epochs, args.peer_lr, OUT / "deepctr" / f"run{i}"))
        o, p = results["recsys"][-1], results["deepctr-torch"][-1]
        print(
            f"[bench_peers] run {i + 1}/{args.runs}: recsys {o['total_s']:.1f} s (AUC {o['test_auc']:.4f}), "
            f"DeepCTR-Torch {p['total_s']:.1f} s (AUC {p['test_auc']:.4f})",
            flush=True,
        )
    saved = {"args": {k: vars(args)[k] for k in ("runs", "epochs", "peer_lr")}, "load": load}
    publish(OUT / "results.json", results | saved, "bench_peers", markdown(results, args, load), not args.no_doc)


if __name__ == "__main__":
    main()
