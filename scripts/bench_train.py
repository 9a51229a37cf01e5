"""Training throughput (samples/s) of a config, and where the time goes; writes docs/benchmarks.md.

    python scripts/bench_train.py                                   # ml100k base config, 2 threads
    python scripts/bench_train.py --config configs/movielens/base.yaml --threads 2 --epochs 3

Three numbers per config, measured in one process on the same data:
  end-to-end   Lightning fit loop incl. data loading (recsys' Throughput callback; first epoch excluded)
  loader only  iterating the training stream, no model
  model only   forward + backward + optimizer step on batches already in memory
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from benchdoc import machine, write_doc_section

from recsys.train.callbacks import Throughput
from recsys.train.cli import run


def measure(config: str | list[str], epochs: int, batch_size: int | None, end_to_end_only: bool = False) -> dict:
    """Samples/s of ``config`` (one file or several, merged in order); ``end_to_end_only``: the fit loop's
    rate alone (``loader`` and ``model`` are then left out)."""
    configs = [config] if isinstance(config, str) else config
    args = [
        *(a for c in configs for a in ("--config", c)),
        "--trainer.max_epochs",
        str(epochs),
        "--trainer.logger",
        "false",
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.limit_val_batches",
        "0",
        "--trainer.callbacks",
        "[]",
    ]
    if batch_size:
        args += ["--data.batch_size", str(batch_size)]
    cli = run(args, subcommand=False)
    meter = next(cb for cb in cli.trainer.callbacks if isinstance(cb, Throughput))  # every recsys run has one
    cli.trainer.fit(cli.model, cli.datamodule)
    end_to_end = sum(meter.rates[1:]) / len(meter.rates[1:])
    if end_to_end_only:
        return {"end_to_end": end_to_end, "batch_size": cli.datamodule.batch_size}

    stream = cli.datamodule.stream("train")
    start = time.perf_counter()
    batches = list(stream)
    loader = sum(len(b) for b in batches) / (time.perf_counter() - start)

    model = cli.model.train()
    optimizer = model.configure_optimizers()
    start = time.perf_counter()
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch.labels)
        loss.backward()
        optimizer.step()
    compute = sum(len(b) for b in batches) / (time.perf_counter() - start)
    return {
        "end_to_end": end_to_end,
        "loader": loader,
        "model": compute,
        "batch_size": cli.datamodule.batch_size,
        "rows": cli.datamodule.stream("train").num_rows,
        "model_class": type(cli.model).__name__,
        "workers": cli.datamodule.num_workers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", nargs="+", default=["configs/movielens/base.yaml"])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--epochs", type=int, default=3, help="epochs to run (the first is warm-up)")
    parser.add_argument("--batch-size", type=int, help="override data.batch_size")
    parser.add_argument(
        "--repeats", type=int, default=3, help="measure this many times; the table shows the median and range"
    )
    parser.add_argument("--doc", default="docs/benchmarks.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for config in args.config:
        runs = []
        for _ in range(args.repeats):
            runs.append(measure(config, args.epochs, args.batch_size))
            r = runs[-1]
            print(
                f"[bench_train] {config}: end-to-end {r['end_to_end']:,.0f} "
                f"samples/s, loader {r['loader']:,.0f}, model {r['model']:,.0f}"
            )

        def cell(key: str, runs: list[dict] = runs) -> str:
            values = sorted(run[key] for run in runs)
            middle = values[len(values) // 2]
            return f"{middle:,.0f}" + (f" ({values[0]:,.0f}–{values[-1]:,.0f})" if len(values) > 1 else "")

        r = runs[0]
        rows.append(
            f"| `{config}` | {r['model_class']} | {r['batch_size']} | {r['workers']} | "
            f"{cell('end_to_end')} | {cell('loader')} | {cell('model')} |"
        )
    md = "\n".join(
        [
            "## Training throughput (`scripts/bench_train.py`)",
            "",
            "Command: `python scripts/bench_train.py --config "
            f"{' '.join(args.config)} --threads {args.threads} --epochs {args.epochs} "
            f"--repeats {args.repeats}`  ",
            f"Machine: {machine()}, {torch.get_num_threads()} torch threads; "
            f"{time.strftime('%Y-%m-%d')}. End-to-end: mean of the epochs "
            "after the first (warm-up), data loading included, no validation. "
            f"Median of {args.repeats} runs (range in brackets): the machine is shared and noisy.",
            "",
            "| config | model | batch | workers | end-to-end samples/s | loader only | model only (fwd+bwd+step) |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    write_doc_section(Path(args.doc), "bench_train", md)
    print(f"[bench_train] wrote {args.doc}")


if __name__ == "__main__":
    main()
