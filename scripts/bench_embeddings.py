"""Embedding tables: FBGEMM fused table-batched kernels (through torchrec DMP) vs per-table
``nn.EmbeddingBag``, and training samples/s at world size 1 vs 2 on synthetic Criteo data.

    python scripts/bench_embeddings.py                       # both parts, 2 threads
    python scripts/bench_embeddings.py --part kernels --dim 64 --max-rows 1000000

Part 1 (kernels): 26 tables, rows log-spaced from --min-rows to --max-rows, one id per table per
sample (Zipf-distributed), batch 4096, forward + backward + Adagrad update. Baseline: one
``nn.EmbeddingBag(sparse=True)`` per table and ``torch.optim.Adagrad`` over sparse gradients.
Part 2 (training): ``recsys fit`` of the base model with ``--trainer.strategy torchrec`` at
``--trainer.devices`` 1 and 2 on synthetic Criteo-shaped data (generated once into data/).
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from benchdoc import machine, write_doc_section

from recsys.data.parquet import release_freed_memory

NUM_TABLES = 26
WARMUP = 5  # untimed steps: first touches of optimizer state and caches


def _ids(rows: list[int], batch: int, rng: np.random.Generator) -> list[torch.Tensor]:
    return [torch.from_numpy(np.minimum(rng.zipf(1.2, batch) - 1, n - 1).astype(np.int64)) for n in rows]


def _rate(step, inputs: list, batch: int) -> float:
    """Samples/s over ``inputs[WARMUP:]`` after untimed steps on ``inputs[:WARMUP]``."""
    for item in inputs[:WARMUP]:
        step(item)
    start = time.perf_counter()
    for item in inputs[WARMUP:]:
        step(item)
    return batch * (len(inputs) - WARMUP) / (time.perf_counter() - start)


def bench_baseline(rows: list[int], dim: int, batch: int, steps: int) -> float:
    bags = torch.nn.ModuleList(torch.nn.EmbeddingBag(n, dim, mode="sum", sparse=True) for n in rows)
    optimizer = torch.optim.Adagrad(bags.parameters(), lr=0.05)
    rng = np.random.default_rng(0)
    data = [_ids(rows, batch, rng) for _ in range(steps + WARMUP)]
    offsets = torch.arange(batch)

    def step(ids: list[torch.Tensor]) -> None:
        optimizer.zero_grad()
        out = torch.cat([bag(i, offsets) for bag, i in zip(bags, ids, strict=True)], dim=1)
        out.pow(2).mean().backward()
        optimizer.step()

    return _rate(step, data, batch)


def bench_fused(rows: list[int], dim: int, batch: int, steps: int, optimizer: str) -> float:
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from recsys.train.strategy import shard_model

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29561")
        dist.init_process_group("gloo", rank=0, world_size=1)
    tables = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=n, feature_names=[f"f{i}"])
        for i, n in enumerate(rows)
    ]
    module = torch.nn.Module()
    module.ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    dmp = shard_model(
        module,
        1,
        torch.device("cpu"),
        sharding_types={"pooled": "table_wise"},
        sparse_optimizer=optimizer,
        sparse_lr=0.05,
        copy_initial_weights=False,
    )
    rng = np.random.default_rng(0)
    keys = [f"f{i}" for i in range(len(rows))]
    lengths = torch.ones(batch * len(rows), dtype=torch.int32)
    data = [
        KeyedJaggedTensor(keys=keys, values=torch.cat(_ids(rows, batch, rng)), lengths=lengths)
        for _ in range(steps + WARMUP)
    ]

    def step(kjt: KeyedJaggedTensor) -> None:
        dmp.module.ebc(kjt).values().pow(2).mean().backward()  # the update runs inside backward

    return _rate(step, data, batch)


def freed(rate: float) -> float:
    """``rate``, after the last measurement's tables and optimizer state are really gone: at dim 128 one
    set is ≈ 10 GB (weights + Adagrad state), and torchrec's modules hold reference cycles, so without a
    collection two sets overlapped and the process was killed for memory on a 24 GiB machine."""
    gc.collect()
    release_freed_memory()
    return rate


def spread(values: list[float]) -> str:
    """``median [min–max]`` of samples/s measurements."""
    return f"{np.median(values):,.0f} [{min(values):,.0f}–{max(values):,.0f}]"


def bench_world_sizes(rows: int, threads: int, repeats: int) -> dict[int, list[float]]:
    data = Path(f"data/synthetic-{rows // 1000}k")
    if not (data / "GENERATED.json").exists():
        subprocess.run(
            [
                sys.executable,
                "datasets/synthetic/generate.py",
                "--rows",
                str(rows),
                "--out",
                str(data),
                "--max-cardinality",
                "100000",
            ],
            check=True,
        )
    recsys = Path(sys.executable).parent / "recsys"
    rates: dict[int, list[float]] = {1: [], 2: []}
    for devices in [d for _ in range(repeats) for d in (1, 2)]:  # interleaved
        env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
        env["OMP_NUM_THREADS"] = str(max(1, threads // devices))
        out = subprocess.run(
            [
                str(recsys),
                "fit",
                "--config",
                "configs/movielens/base.yaml",
                "--data.path",
                str(data),
                "--data.batch_size",
                "4096",
                "--trainer.strategy",
                "torchrec",
                "--trainer.devices",
                str(devices),
                "--trainer.max_epochs",
                "1",
                "--trainer.limit_val_batches",
                "0",
                "--trainer.logger",
                "false",
                "--trainer.enable_checkpointing",
                "false",
                "--trainer.callbacks",
                "[]",
                "--trainer.enable_progress_bar",
                "false",
            ],
            capture_output=True,
            text=True,
            env=env,
        )
        found = re.findall(r"epoch 0: ([\d,]+) training samples/s", out.stdout + out.stderr)
        if out.returncode != 0 or not found:
            raise RuntimeError(f"recsys fit at {devices} device(s) failed:\n{(out.stdout + out.stderr)[-3000:]}")
        rates[devices].append(float(found[-1].replace(",", "")))
        print(f"[bench_embeddings] world size {devices}: {rates[devices][-1]:,.0f} samples/s", flush=True)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["kernels", "training", "all"], default="all")
    parser.add_argument("--min-rows", type=int, default=100_000)
    parser.add_argument("--max-rows", type=int, default=1_000_000)
    parser.add_argument("--dims", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="measurements per cell (interleaved); median and range")
    parser.add_argument("--train-rows", type=int, default=1_000_000, help="synthetic rows for the world-size part")
    parser.add_argument("--doc", default="docs/benchmarks.md")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    torch.set_num_threads(args.threads)
    rows = np.geomspace(args.min_rows, args.max_rows, NUM_TABLES).astype(int).tolist()
    header = [
        f"Command: `python scripts/bench_embeddings.py --part {args.part} --dims {' '.join(map(str, args.dims))} "
        f"--batch {args.batch} --steps {args.steps} --threads {args.threads} --repeats {args.repeats}`  ",
        f"Machine: {machine()}, {args.threads} torch threads; {time.strftime('%Y-%m-%d')}. Each cell: median of "
        f"{args.repeats} measurements (interleaved with the other columns) [min–max].",
    ]
    if args.part in ("kernels", "all"):
        lines = [
            "## Embedding kernels: FBGEMM fused TBE vs nn.EmbeddingBag (`scripts/bench_embeddings.py`)",
            "",
            *header,
            "",
            f"{NUM_TABLES} tables of {args.min_rows:,}–{args.max_rows:,} rows, one Zipf id per table per sample, "
            f"batch {args.batch}; forward + backward + update.",
            "",
            "| dim | nn.EmbeddingBag ×26 + Adagrad (samples/s) | FBGEMM fused "
            "TBE, Adagrad | fused, row-wise Adagrad | speed-up (Adagrad) |",
            "|---|---|---|---|---|",
        ]
        for dim in args.dims:
            runs: dict[str, list[float]] = {"base": [], "fused": [], "rowwise": []}
            for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits every column
                runs["base"].append(freed(bench_baseline(rows, dim, args.batch, args.steps)))
                runs["fused"].append(freed(bench_fused(rows, dim, args.batch, args.steps, "adagrad")))
                runs["rowwise"].append(freed(bench_fused(rows, dim, args.batch, args.steps, "rowwise_adagrad")))
            print(f"[bench_embeddings] dim {dim}: {runs}", flush=True)
            ratio = float(np.median(runs["fused"]) / np.median(runs["base"]))
            cells = " | ".join(spread(runs[k]) for k in ("base", "fused", "rowwise"))
            lines.append(f"| {dim} | {cells} | {ratio:.2f}× |")
        write_doc_section(Path(args.doc), "bench_embeddings", "\n".join(lines))
    if args.part in ("training", "all"):
        if dist.is_initialized():
            dist.destroy_process_group()
        rates = bench_world_sizes(args.train_rows, args.threads, args.repeats)
        lines = [
            "## Training at world size 1 and 2 (`scripts/bench_embeddings.py --part training`)",
            "",
            *header,
            "",
            f"Base model, synthetic Criteo-shaped data ({args.train_rows:,} rows, 39 features), batch 4096 per rank, "
            "torchrec strategy (gloo), one epoch, rank threads = threads / world size. On one 2-core machine the two "
            "ranks share the cores (one thread each; one rank alone uses both).",
            "",
            "| world size | training samples/s (all ranks) |",
            "|---|---|",
        ]
        lines += [f"| {w} | {spread(r)} |" for w, r in rates.items()]
        write_doc_section(Path(args.doc), "bench_world_sizes", "\n".join(lines))
    print(f"[bench_embeddings] wrote {args.doc}")


if __name__ == "__main__":
    main()
