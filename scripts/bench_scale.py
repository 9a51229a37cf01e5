"""Out-of-core training at scale: samples/s and peak memory vs rows (2M, 20M) and vs world size.

    python scripts/bench_scale.py                                  # 2M and 20M rows; world sizes 1, 2 on 2M
    python scripts/bench_scale.py --rows 2000000 --world-sizes 1   # a quick look

Per dataset size (synthetic Criteo-shaped, ``datasets/synthetic/generate.py --max-cardinality
100000``, generated once into data/synthetic-<N>): the loader alone (the train DataLoader with
``--workers`` worker processes, no model) and one training epoch of DLRM
(``configs/synthetic/dlrm.yaml``: FBGEMM fused row-wise Adagrad tables under the torchrec
strategy, Adam on the MLPs), each in its own process. Memory is the peak over the run of the
summed PSS (proportional set size: shared pages split between processes, so the main process
and its dataloader workers add up without double counting) of the process and all its
children, sampled every 0.25 s from /proc. Writes runs/bench_scale/results.json,
docs/scale_memory.png and the ``bench_scale`` block of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchdoc import machine, write_doc_section

OUT = Path("runs/bench_scale")
MAX_CARDINALITY = 100_000


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                found.append(int(entry))
    return found


def tree_pss(pid: int) -> int:
    """Summed PSS in bytes of ``pid`` and its descendants."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
        stack += _children(p)
    return total


def measured(command: list[str], log: Path) -> dict:
    """Runs ``command`` and samples its process tree's memory; returns peak, trace and output."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        trace: list[tuple[float, int]] = []
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                trace.append((time.perf_counter() - start, tree_pss(proc.pid)))
                done.wait(0.25)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = proc.wait()
        done.set()
        sampler.join()
    text = log.read_text()
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({code}); see {log}:\n{text[-3000:]}")
    return {
        "seconds": time.perf_counter() - start,
        "peak_bytes": max(b for _, b in trace),
        "trace": trace,
        "output": text,
    }


def ensure_data(rows: int) -> tuple[Path, float | None]:
    path = Path(f"data/synthetic-{rows // 1_000_000}m")
    if (path / "GENERATED.json").exists():
        return path, None
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "datasets/synthetic/generate.py",
            "--rows",
            str(rows),
            "--out",
            str(path),
            "--max-cardinality",
            str(MAX_CARDINALITY),
            "--seed",
            "0",
        ],
        check=True,
    )
    return path, time.perf_counter() - start


LOADER = """
import sys, time, torch
from recsys.data.datamodule import CTRDataModule
dm = CTRDataModule(sys.argv[1], batch_size=int(sys.argv[2]), num_workers=int(sys.argv[3]))
loader = dm.train_dataloader()
limit = int(sys.argv[4])
rows = 0
start = time.perf_counter()
for i, batch in enumerate(loader):
    rows += len(batch)
    if i + 1 == limit:
        break
print(f"LOADER {rows / (time.perf_counter() - start):.1f} samples/s over {rows} rows")
"""


def run_size(rows: int, args: argparse.Namespace) -> list[dict]:
    data, generate_s = ensure_data(rows)
    recsys = str(Path(sys.executable).parent / "recsys")
    # vocabularies first (once per dataset), so the two measurements below see the same start
    vocab = measured(
        [sys.executable, "-c", f"from recsys.data.vocab import Vocabulary; Vocabulary.load_or_build({str(data)!r})"],
        OUT / f"vocab_{data.name}.log",
    )
    loader = measured(
        [sys.executable, "-c", LOADER, str(data), str(args.batch_size), str(args.workers), str(args.loader_batches)],
        OUT / f"loader_{data.name}.log",
    )
    loader_rate = float(re.search(r"LOADER ([\d.]+) samples/s", loader["output"]).group(1))
    results = []
    for world in args.world_sizes if rows == min(args.rows) else [1]:
        train = measured(
            [
                recsys,
                "fit",
                "--config",
                "configs/synthetic/dlrm.yaml",
                "--data.path",
                str(data),
                "--data.batch_size",
                str(args.batch_size),
                "--data.num_workers",
                str(args.workers),
                "--trainer.devices",
                str(world),
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.logger.init_args.save_dir",
                str(OUT / "runs"),
                "--trainer.logger.init_args.name",
                "",
                "--trainer.logger.init_args.version",
                f"{data.name}_w{world}",
            ],
            OUT / f"train_{data.name}_w{world}.log",
        )
        rate = float(re.search(r"epoch 0: ([\d,]+) training samples/s", train["output"]).group(1).replace(",", ""))
        auc = re.search(r"val/auc=([\d.]+)", train["output"])
        results.append(
            {
                "rows": rows,
                "train_rows": json.loads((data / "GENERATED.json").read_text())["rows"]["train"],
                "world_size": world,
                "workers": args.workers,
                "batch_size": args.batch_size,
                "generate_seconds": generate_s,
                "vocab_seconds": vocab["seconds"],
                "vocab_peak_bytes": vocab["peak_bytes"],
                "loader_samples_per_s": loader_rate,
                "loader_peak_bytes": loader["peak_bytes"],
                "train_samples_per_s": rate,
                "train_seconds": train["seconds"],
                "train_peak_bytes": train["peak_bytes"],
                "val_auc": float(auc.group(1)) if auc else None,
                "trace": train["trace"],
            }
        )
        print(json.dumps({k: v for k, v in results[-1].items() if k != "trace"}), flush=True)
    return results


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        if r["world_size"] != 1:
            continue
        t, b = zip(*r["trace"], strict=True)
        ax.plot(
            [x / t[-1] for x in t], [x / 2**30 for x in b], label=f"{r['rows'] / 1e6:.0f}M rows ({t[-1] / 60:.1f} min)"
        )
    ax.set_xlabel("fraction of the run (one epoch + validation)")
    ax.set_ylabel("PSS of the process tree (GiB)")
    ax.set_ylim(bottom=0)
    ax.legend()
    single = sorted((r for r in results if r["world_size"] == 1), key=lambda r: r["rows"])
    if len(single) > 1:  # the title states what this run measured, nothing more
        low, high = single[0], single[-1]
        growth, more = high["train_peak_bytes"] / low["train_peak_bytes"], high["rows"] / low["rows"]
        ax.set_title(
            f"peak {high['train_peak_bytes'] / 2**30:.2f} GiB at {high['rows'] / 1e6:.0f}M rows vs "
            f"{low['train_peak_bytes'] / 2**30:.2f} GiB at {low['rows'] / 1e6:.0f}M "
            f"({growth:.2f}× for {more:.0f}× the rows)"
        )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    base = next(r for r in results if r["rows"] == min(args.rows) and r["world_size"] == 1)
    lines = [
        f"`python scripts/bench_scale.py` — {machine()}; DLRM (`configs/synthetic/dlrm.yaml`: 26 tables × 16, FBGEMM "
        f"fused row-wise Adagrad under the torchrec strategy, Adam on the MLPs), one epoch, batch {args.batch_size}, "
        f"{args.workers} dataloader workers, synthetic Criteo-shaped data (13 numeric + 26 categorical, cardinalities "
        f"10…{MAX_CARDINALITY:,}, seed 0). Peak memory: summed PSS of the process and its workers (and ranks), sampled "
        f"every 0.25 s. Loader alone: the same train DataLoader without a model, first {args.loader_batches} batches.",
        "",
        "| rows (train) | ranks | loader alone samples/s | training samples/s | "
        "training peak PSS | vs 2M | epoch + val wall | vocab build | val AUC |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['rows'] / 1e6:.0f}M ({r['train_rows']:,}) | {r['world_size']} | {r['loader_samples_per_s']:,.0f} | "
            f"{r['train_samples_per_s']:,.0f} | {r['train_peak_bytes'] / 2**30:.2f} GiB | "
            f"{r['train_peak_bytes'] / base['train_peak_bytes']:.2f}× | {r['train_seconds'] / 60:.1f} min | "
            f"{r['vocab_seconds']:.0f} s | {r['val_auc'] if r['val_auc'] is not None else '—'} |"
        )
    generated = {r["rows"]: r["generate_seconds"] for r in results if r["generate_seconds"]}  # once per size
    gens = [f"{rows / 1e6:.0f}M rows in {seconds / 60:.1f} min" for rows, seconds in generated.items()]
    if gens:
        lines += [
            "",
            "Data generation (`datasets/synthetic/generate.py`, streamed in 500k-row chunks): " + ", ".join(gens) + ".",
        ]
    lines += ["", "![training memory over the run](scale_memory.png)"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", type=int, default=[2_000_000, 20_000_000])
    parser.add_argument("--world-sizes", nargs="+", type=int, default=[1, 2], help="on the smallest dataset")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--loader-batches", type=int, default=300)
    parser.add_argument("--no-doc", action="store_true")
    replot = "re-render the block from runs/bench_scale/results.json (give the run's own arguments)"
    parser.add_argument("--replot", action="store_true", help=replot)
    args = parser.parse_args()
    if args.replot:
        results = json.loads((OUT / "results.json").read_text())
    else:
        results = [r for rows in sorted(args.rows) for r in run_size(rows, args)]
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "results.json").write_text(json.dumps(results, indent=2))
    text = markdown(results, args)
    print(text)
    if not args.no_doc:
        plot(results, Path("docs/scale_memory.png"))
        write_doc_section("docs/benchmarks.md", "bench_scale", text)


if __name__ == "__main__":
    main()
