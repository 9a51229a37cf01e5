"""Training samples/s of every text pooling head inside DIN and the two-tower model (ml100k-ctr).

    python scripts/bench_heads.py                       # eight heads, DIN and two-tower, 2 threads
    python scripts/bench_heads.py --heads latent --models din --repeats 1

Per model and head: ``configs/movielens/<model>.yaml`` + ``configs/text/<head>.yaml``, the end-to-end
rate of Lightning's fit loop in this process (data loading included, no validation, no checkpoints,
the epochs after the first), median of ``--repeats`` runs with the range; the same model without
text beside it. (``scripts/bench_train.py`` times the whole run a user starts instead.)
Writes the ``bench_heads`` block of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from benchdoc import machine, write_doc_section

from recsys.text.pooling import HEADS
from recsys.train.callbacks import Throughput
from recsys.train.cli import run

MODELS = {"din": "configs/movielens/din.yaml", "two_tower": "configs/movielens/two_tower.yaml"}


def fit_rate(configs: list[str], epochs: int) -> float:
    """Training samples/s of ``configs`` (merged in order): the mean of the epochs after the first, as
    recsys' Throughput callback measures them, without validation, checkpoints or a logger."""
    args = [a for c in configs for a in ("--config", c)] + ["--trainer.max_epochs", str(epochs)]
    args += ["--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]"]
    args += ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    args += ["--trainer.limit_val_batches", "0"]
    cli = run(args, subcommand=False)
    meter = next(cb for cb in cli.trainer.callbacks if isinstance(cb, Throughput))  # every recsys run has one
    cli.trainer.fit(cli.model, cli.datamodule)
    return sum(meter.rates[1:]) / len(meter.rates[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run (the first is warm-up)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch is warm-up, left out of the rate")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rates: dict[tuple[str, str], list[float]] = {}
    for model, config in MODELS.items():
        if model not in args.models:
            continue
        for head in ["none", *args.heads]:
            configs = [config] + ([f"configs/text/{head}.yaml"] if head != "none" else [])
            for _ in range(args.repeats):
                rate = fit_rate(configs, args.epochs)
                rates.setdefault((model, head), []).append(rate)
                print(f"[bench_heads] {model} {head}: {rate:,.0f} samples/s", flush=True)

    def cell(values: list[float]) -> str:
        values = sorted(values)
        return f"{np.median(values):,.0f} ({values[0]:,.0f}–{values[-1]:,.0f})"

    lines = [
        f"`python scripts/bench_heads.py --heads {' '.join(args.heads)} --models {' '.join(args.models)} "
        f"--threads {args.threads} --epochs {args.epochs} --repeats {args.repeats}` — {machine()}, "
        f"{torch.get_num_threads()} torch threads, {(time.perf_counter() - start) / 60:.0f} min. ml100k-ctr train "
        "split, the shipped configs; samples/s of the fit loop with data loading, no validation, epochs after the "
        f"first; median of {args.repeats} runs (range).",
        "",
        "| head | " + " | ".join(f"{m} samples/s" for m in args.models) + " |",
        "|---|" + "---:|" * len(args.models),
    ]
    for head in ["none", *args.heads]:
        lines.append(f"| {head} | " + " | ".join(cell(rates[(m, head)]) for m in args.models) + " |")
    text = "\n".join(lines)
    print(text)
    if not args.no_doc:
        write_doc_section("docs/benchmarks.md", "bench_heads", text)


if __name__ == "__main__":
    main()
