"""The training run a user starts, timed the way they would: this checkout beside an older commit.

    python scripts/bench_train.py                        # din.yaml, 3 epochs, this checkout vs ac0ab83, 3 runs each
    python scripts/bench_train.py --configs configs/movielens/din.yaml configs/movielens/base.yaml --runs 5

Per run, in fresh processes and with the checkouts alternating (a slow minute hits both):
``recsys fit --config CONFIG --trainer.max_epochs E`` exactly as the config ships it (TensorBoard
logger, checkpointing, validation after every epoch, progress bar), then ``recsys eval --ckpt
best.ckpt --split test``. Reported per checkout, median [min–max] over the runs:

- training samples/s: the run's own ``[recsys] epoch N`` lines (rows over the time from an epoch's
  start to its last step, data loading included), mean of the epochs after the first;
- wall time of the fit, of the eval, and their sum: from prepared data to a trained + evaluated model;
- test AUC (the eval's report).

The older checkout (``--baseline``, a git worktree under runs/bench_startup/) trains on ml100k-ctr as
its own prepare.py writes it. Writes runs/bench_train/results.json and the ``bench_train`` block of
docs/benchmarks.md. ``scripts/profile_train_step.py`` says where a step's time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import time
from pathlib import Path

import numpy as np
from benchdoc import machine, write_doc_section
from checkouts import ROOT, check_imports_from, checkout_of, environment, prepared_data, recsys

OUT = ROOT / "runs" / "bench_train"
EPOCH_LINE = re.compile(r"\[recsys\] epoch (\d+): ([\d,]+) training samples/s")
BEST_LINE = re.compile(r"\[recsys\] best checkpoint: (\S+)")


def timed(checkout: Path, args: list[str], log: Path) -> tuple[float, str]:
    """Wall seconds of ``recsys ARGS`` in a fresh process, and its output (also written to ``log``)."""
    start = time.perf_counter()
    done = subprocess.run(recsys(*args), cwd=checkout, env=environment(), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(done.stdout + done.stderr)
    if done.returncode:
        raise RuntimeError(f"recsys {' '.join(args)} failed in {checkout} (exit {done.returncode}); see {log}")
    return seconds, done.stdout + done.stderr


def one_run(checkout: Path, data: Path, config: str, epochs: int, out: Path) -> dict:
    """Fit then eval, as a user runs them; their times, the epochs' rates and the test AUC."""
    fit = ["fit", "--config", config, "--data.path", str(data), "--trainer.max_epochs", str(epochs)]
    fit += ["--trainer.logger.init_args.save_dir", str(out), "--trainer.logger.init_args.name", ""]
    fit += ["--trainer.logger.init_args.version", "fit"]
    fit_seconds, text = timed(checkout, fit, out / "fit.log")
    rates = [float(r.replace(",", "")) for _, r in EPOCH_LINE.findall(text)]
    best = BEST_LINE.search(text)
    if len(rates) != epochs or best is None:
        raise RuntimeError(f"{out / 'fit.log'}: expected {epochs} epoch lines and the best checkpoint")
    evaluated = ["eval", "--ckpt", best.group(1), "--split", "test", "--out", str(out / "eval_test")]
    eval_seconds, _ = timed(checkout, evaluated, out / "eval.log")
    report = json.loads((out / "eval_test" / "report.json").read_text())
    return {
        "rates": rates,
        "samples_per_s": float(np.mean(rates[1:] if len(rates) > 1 else rates)),
        "fit_s": fit_seconds,
        "eval_s": eval_seconds,
        "total_s": fit_seconds + eval_seconds,
        "test_auc": report["auc"],
    }


def measure(checkouts: dict[str, Path], configs: list[str], epochs: int, runs: int) -> dict:
    data = {name: prepared_data(path, name) for name, path in checkouts.items()}
    results: dict = {config: {name: [] for name in checkouts} for config in configs}
    for i in range(runs):
        for config in configs:
            for name, path in checkouts.items():
                out = OUT / Path(config).stem / name.split()[0] / f"run{i}"
                r = one_run(path, data[name], config, epochs, out)
                results[config][name].append(r)
                print(
                    f"[bench_train] {config} {name} run {i + 1}/{runs}: {r['samples_per_s']:,.0f} samples/s, "
                    f"fit {r['fit_s']:.1f} s + eval {r['eval_s']:.1f} s, test AUC {r['test_auc']:.4f}",
                    flush=True,
                )
    return results


def spread(values: list[float], fmt: str) -> str:
    return f"{np.median(values):{fmt}} [{min(values):{fmt}}–{max(values):{fmt}}]"


def markdown(results: dict, args: argparse.Namespace, load: float) -> str:
    lines = [
        "## Training a user starts (`scripts/bench_train.py`)",
        "",
        f"`python scripts/bench_train.py --configs {' '.join(args.configs)} --epochs {args.epochs} --runs {args.runs} "
        f"--baseline {args.baseline}` — {machine()}; OMP_NUM_THREADS={environment()['OMP_NUM_THREADS']}, load "
        f"average {load:.2f} at the start; {time.strftime('%Y-%m-%d')}. Each run: `recsys fit` of the config as "
        f"shipped ({args.epochs} epochs, validation and checkpoints included) in a fresh process, then `recsys "
        "eval` of its best checkpoint on test in another; the checkouts alternate. Median [min–max] over the "
        "runs. Samples/s: the run's own epoch lines, mean of the epochs after the first.",
        "",
        "| config | checkout | training samples/s | fit wall | eval wall | trained + evaluated | test AUC |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for config, by_checkout in results.items():
        for name, runs in by_checkout.items():
            lines.append(
                f"| `{config}` | {name} | {spread([r['samples_per_s'] for r in runs], ',.0f')} | "
                f"{spread([r['fit_s'] for r in runs], '.1f')} s | {spread([r['eval_s'] for r in runs], '.1f')} s | "
                f"{spread([r['total_s'] for r in runs], '.1f')} s | {spread([r['test_auc'] for r in runs], '.4f')} |"
            )
        names = list(by_checkout)
        if len(names) == 2:
            ours, theirs = ([r["samples_per_s"] for r in by_checkout[n]] for n in names)
            ratios = [a / b for a, b in zip(ours, theirs, strict=True)]  # run i of each: minutes apart
            lines.append(
                f"| `{config}` | ratio (run by run) | {spread(ratios, '.2f')}× | | | "
                f"{spread([b['total_s'] / a['total_s'] for a, b in zip(*by_checkout.values(), strict=True)], '.2f')}×"
                " faster | |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["configs/movielens/din.yaml"])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per fit (the first is not in the rate)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline", default="ac0ab83", help="the commit to compare with ('' for none)")
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    checkouts = {f"this checkout ({head.strip()})": ROOT}
    if args.baseline:
        checkouts[args.baseline] = checkout_of(args.baseline)
    for path in checkouts.values():
        check_imports_from(path)
    results = measure(checkouts, args.configs, args.epochs, args.runs)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    text = markdown(results, args, load)
    print(text)
    if not args.no_doc:
        write_doc_section(ROOT / "docs" / "benchmarks.md", "bench_train", text)


if __name__ == "__main__":
    main()
