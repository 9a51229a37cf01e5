"""The training run a user starts, timed the way they would: this checkout beside an older commit.

    python scripts/bench_train.py                        # din.yaml, 3 epochs, this checkout vs ac0ab83, 3 runs each
    python scripts/bench_train.py --configs configs/movielens/din.yaml configs/movielens/base.yaml --runs 5
    python scripts/bench_train.py --baseline '' --variant "fused TBE=--trainer.strategy torchrec"

Per run, in fresh processes and with the checkouts alternating (a slow minute hits both):
``recsys fit --config CONFIG --trainer.max_epochs E`` exactly as the config ships it (TensorBoard
logger, checkpointing, validation after every epoch, progress bar), then ``recsys eval --ckpt
best.ckpt --split test``. Reported per checkout, median [min–max] over the runs:

- training samples/s: the run's own ``[recsys] epoch N`` lines (rows over the time from an epoch's
  start to its last step, data loading included), mean of the epochs after the first;
- wall time of the fit, of the eval, and their sum: from prepared data to a trained + evaluated model;
- test AUC (the eval's report).

The older checkout (``--baseline``, a git worktree under runs/bench_startup/) trains on ml100k-ctr as
its own prepare.py writes it. ``--variant NAME=ARGS`` adds runs of this checkout with more fit
arguments (e.g. the FBGEMM fused path). Writes runs/bench_train/<section>.json and the ``bench_train``
block of docs/benchmarks.md (``--section`` another block). ``scripts/profile_train_step.py`` says where
a step's time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
from benchdoc import machine, publish, spread
from checkouts import ROOT, check_imports_from, checkout_of, environment, prepared_data, recsys, this_checkout

OUT = ROOT / "runs" / "bench_train"
EPOCH_LINE = re.compile(r"\[recsys\] epoch (\d+): ([\d,]+) training samples/s")
BEST_LINE = re.compile(r"\[recsys\] best checkpoint: (.+?\.ckpt)")


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


def one_run(checkout: Path, data: Path, config: str, epochs: int, out: Path, extra: tuple | list = ()) -> dict:
    """Fit then eval, as a user runs them; their times, the epochs' rates and the test AUC. The run's
    own folders under ``out`` (``fit/``, ``eval_test/``) are replaced: an earlier run's best.ckpt there
    would make Lightning name this one best-v1.ckpt."""
    for own in ("fit", "eval_test"):
        shutil.rmtree(out / own, ignore_errors=True)
    fit = ["fit", "--config", config, "--data.path", str(data), "--trainer.max_epochs", str(epochs), *extra]
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


def measure(checkouts: dict[str, tuple[Path, list[str]]], configs: list[str], epochs: int, runs: int) -> dict:
    """``checkouts``: row name → (checkout, extra fit arguments)."""
    data = {name: prepared_data(path, name.split()[0]) for name, (path, _) in checkouts.items()}
    results: dict = {config: {name: [] for name in checkouts} for config in configs}
    for i in range(runs):
        for config in configs:
            for row, (name, (path, extra)) in enumerate(checkouts.items()):
                out = OUT / config.replace("/", "_").removesuffix(".yaml") / f"row{row}" / f"run{i}"
                r = one_run(path, data[name], config, epochs, out, extra)
                results[config][name].append(r)
                print(
                    f"[bench_train] {config} {name} run {i + 1}/{runs}: {r['samples_per_s']:,.0f} samples/s, "
                    f"fit {r['fit_s']:.1f} s + eval {r['eval_s']:.1f} s, test AUC {r['test_auc']:.4f}",
                    flush=True,
                )
    return results


def markdown(results: dict, args: argparse.Namespace, load: float) -> str:
    variants = "".join(f' --variant "{v}"' for v in args.variant)
    lines = [
        "## Training a user starts (`scripts/bench_train.py`)",
        "",
        f"`python scripts/bench_train.py --configs {' '.join(args.configs)} --epochs {args.epochs} "
        f"--runs {args.runs} --baseline '{args.baseline}'{variants}` — {machine()}; "
        f"OMP_NUM_THREADS={environment()['OMP_NUM_THREADS']}, load average {load:.2f} at the start; "
        f"{time.strftime('%Y-%m-%d')}. Each run: `recsys fit` of the config as shipped ({args.epochs} "
        "epochs, validation and checkpoints included) in a fresh process, then `recsys eval` of its best "
        "checkpoint on test in another; the rows alternate. Median [min–max] over the runs. Samples/s: the "
        "run's own epoch lines, mean of the epochs after the first.",
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
        first, *others = by_checkout
        for other in others:  # run i of each row: minutes apart
            pairs = list(zip(by_checkout[first], by_checkout[other], strict=True))
            rates = spread([a["samples_per_s"] / b["samples_per_s"] for a, b in pairs], ".2f")
            totals = spread([b["total_s"] / a["total_s"] for a, b in pairs], ".2f")
            lines.append(f"| `{config}` | first row ÷ {other} (run by run) | {rates}× | | | {totals}× faster | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["configs/movielens/din.yaml"])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per fit (the first is not in the rate)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline", default="ac0ab83", help="the commit to compare with ('' for none)")
    parser.add_argument(
        "--variant", action="append", default=[], metavar="NAME=ARGS", help="more runs of this checkout with ARGS"
    )
    parser.add_argument("--section", default="bench_train", help="the docs/benchmarks.md block to write")
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    this = this_checkout()
    checkouts: dict[str, tuple[Path, list[str]]] = {this: (ROOT, [])}
    for variant in args.variant:
        name, _, extra = variant.partition("=")
        checkouts[f"{this}, {name}: `{extra}`"] = (ROOT, shlex.split(extra))
    if args.baseline:
        checkouts[args.baseline] = (checkout_of(args.baseline), [])
    for path, _ in checkouts.values():
        check_imports_from(path)
    results = measure(checkouts, args.configs, args.epochs, args.runs)
    publish(OUT / f"{args.section}.json", results, args.section, markdown(results, args, load), not args.no_doc)


if __name__ == "__main__":
    main()
