"""Where a training step's time goes: torch profiler over forward + backward + optimizer step.

    python scripts/profile_train_step.py --config configs/movielens/din.yaml --batches 10 --threads 2

Batches are read first, so the table covers the model alone (see scripts/bench_train.py for the
loader). Writes the top operators to docs/benchmarks.md (block ``profile_<config name>``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from benchdoc import machine, write_doc_section
from torch.profiler import ProfilerActivity, profile

from recsys.train.cli import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/movielens/din.yaml")
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--doc", default="docs/benchmarks.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cli = run(["--config", args.config, "--trainer.logger", "false"], subcommand=False)
    model, stream = cli.model.train(), cli.datamodule.stream("train")
    batches = []
    for batch in stream:
        batches.append(batch)
        if len(batches) == args.batches + 3:
            break
    optimizer = model.configure_optimizers()

    def step(batch) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = model.training_loss(batch) + model.embedding.regularization()
        loss.backward()
        optimizer.step()

    for batch in batches[:3]:
        step(batch)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches[3:]:
            step(batch)
    seconds = time.perf_counter() - start
    rows = sum(len(b) for b in batches[3:])
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    lines = [
        f"## Where a training step's time goes: `{args.config}` (`scripts/profile_train_step.py`)",
        "",
        "Command: `python scripts/profile_train_step.py --config "
        f"{args.config} --batches {args.batches} --threads {args.threads}`  ",
        f"Machine: {machine()}, {args.threads} torch threads; batch {cli.datamodule.batch_size}; "
        f"{rows / seconds:,.0f} samples/s under the profiler (model "
        f"only, loader excluded); {time.strftime('%Y-%m-%d')}.",
        "",
        "| operator | self CPU ms | share | calls |",
        "|---|---|---|---|",
    ]
    for e in events[: args.top]:
        lines.append(
            f"| `{e.key}` | {e.self_cpu_time_total / 1000:.1f} | {e.self_cpu_time_total / total:.0%} | {e.count} |"
        )
    md = "\n".join(lines)
    print(md)
    write_doc_section(Path(args.doc), f"profile_{Path(args.config).stem}", md)


if __name__ == "__main__":
    main()
