"""Online training on the drifting stream: next-day AUC of four ways to embed ids that keep arriving.

    python scripts/bench_online.py                                   # data/stream (made if missing), 3 seeds
    python scripts/bench_online.py --seeds 1 --rows-per-day 200000 --data data/stream-200k

Each run is `recsys fit --config configs/stream/base.yaml --data.days FIRST:LAST` (one day per epoch,
validation on the next day) with the drifting features embedded as
  vocab    a vocabulary built from day 1, every later id OOV (the dataset as generated)
  hashed   raw ids (`vocabulary: none`) hashed into a table per feature
  unified  raw ids hashed into one shared table
  managed  raw ids in managed tables (admission, LRU eviction, fresh rows for new ids)
at the same embedding memory: the vocab tables' bytes, per feature, for hashed and managed (a managed
slot also pays its statistics, 40 bytes: id, slot, last access, count, last step), in all for unified.
The static features keep their vocabularies in every run. Raw-id runs read a copy of the dataset
(`<data>-raw`: the schema with `vocabulary: none`, the day folders linked). Nothing is tuned: every
setting is fixed before the runs, the same for every seed. Writes the `bench_online` block of
docs/benchmarks.md and docs/online_auc.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml
from benchdoc import machine, reused_or_run, write_doc_section

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("vocab", "hashed", "unified", "managed")
DIM = 16
SLOT_STATS_BYTES = 40  # per managed slot: torchrec's sorted id, slot and last access + recsys' count, last step


class DayStats(L.Callback):
    """Appends each day's resident memory (now and peak so far, MiB) to $BENCH_ONLINE_STATS; with
    $BENCH_ONLINE_DAYS, saves each day's checkpoint there (day-<epoch>.ckpt) for the delta chain."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        mib = {k: int(status[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}
        with open(os.environ["BENCH_ONLINE_STATS"], "a") as out:
            out.write(json.dumps({"epoch": trainer.current_epoch, **mib}) + "\n")
        if os.environ.get("BENCH_ONLINE_DAYS"):
            trainer.save_checkpoint(Path(os.environ["BENCH_ONLINE_DAYS"]) / f"day-{trainer.current_epoch}.ckpt")


def ensure_data(data: Path, rows_per_day: int, days: int) -> dict:
    if not (data / "STREAM.json").exists():
        command = [sys.executable, str(ROOT / "datasets/synthetic/stream.py"), "--out", str(data)]
        subprocess.run([*command, "--rows-per-day", str(rows_per_day), "--days", str(days)], check=True)
    return json.loads((data / "STREAM.json").read_text())


def raw_copy(data: Path, drifting: list[str]) -> Path:
    """``<data>-raw``: the same day folders (linked), the drifting features with `vocabulary: none`."""
    raw = data.with_name(data.name + "-raw")
    raw.mkdir(exist_ok=True)
    schema = yaml.safe_load((data / "schema.yaml").read_text())
    for feature in schema["features"]:
        if feature["name"] in drifting:
            feature["vocabulary"] = "none"
    (raw / "schema.yaml").write_text(yaml.safe_dump(schema, sort_keys=False))
    if not (raw / "train").exists():
        (raw / "train").symlink_to(os.path.relpath(data / "train", raw))
    return raw


def blocks(rows: dict[str, int]) -> dict[str, dict]:
    """The embedding block of each kind; ``rows``: each drifting feature's vocab rows (day 1)."""
    base = {"kind": "plain", "dim": DIM, "pooling": "sum"}
    row_bytes = DIM * 4
    capacity = {f: n * row_bytes // (row_bytes + SLOT_STATS_BYTES) for f, n in rows.items()}
    managed = {"kind": "managed", "admit_after": 2, "eviction": "lru", "interval": 1}
    return {
        "vocab": base,
        "hashed": base | {"features": {f: {"kind": "hashed", "rows": n} for f, n in rows.items()}},
        "unified": base | {"rows": sum(rows.values()), "probes": 1, "features": {f: {"kind": "unified"} for f in rows}},
        "managed": base | {"features": {f: managed | {"capacity": capacity[f]} for f in rows}},
    }


def memory_bytes(kind: str, block: dict, rows: dict[str, int]) -> int:
    """The drifting features' embedding memory: rows × width × 4 (+ slot statistics for managed)."""
    if kind == "unified":
        return block["rows"] * DIM * 4
    if kind == "managed":
        return sum(e["capacity"] * (DIM * 4 + SLOT_STATS_BYTES) for e in block["features"].values())
    return sum(rows.values()) * DIM * 4


def scalars(log_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def fit(kind: str, block: dict, data: Path, days: str, seed: int, out: Path, keep_days: bool = False) -> dict:
    stats_file = out / "days.jsonl"
    stats_file.unlink(missing_ok=True)
    command = [
        str(Path(sys.executable).parent / "recsys"),
        "fit",
        "--config",
        str(ROOT / "configs/stream/base.yaml"),
        "--data.path",
        str(data),
        "--data.days",
        days,
        "--seed_everything",
        str(seed),
        "--model.init_args.embedding",
        json.dumps(block),
        "--trainer.logger.init_args.save_dir",
        str(out),
        "--trainer.logger.init_args.name",
        kind,
        "--trainer.logger.init_args.version",
        "run",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.callbacks+=bench_online.DayStats",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "scripts"), "BENCH_ONLINE_STATS": str(stats_file)}
    if keep_days:  # the day checkpoints a delta chain is exported from
        (out / "days").mkdir(parents=True, exist_ok=True)
        env["BENCH_ONLINE_DAYS"] = str(out / "days")
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"{kind} seed {seed} failed:\n{done.stderr[-4000:]}")
    logged = scalars(out / kind / "run")
    memory = [json.loads(line) for line in stats_file.read_text().splitlines()]
    managed = {k: v for k, v in logged.items() if k.startswith("managed/")}
    return {
        "next_day_auc": logged["val/auc"],
        "samples_per_s": logged["train/samples_per_s"],
        "rss_mib": [m["VmRSS"] for m in memory],
        "peak_mib": [m["VmHWM"] for m in memory],
        "admissions": [sum(v) for v in zip(*(v for k, v in managed.items() if k.endswith("/admissions")), strict=True)],
        "evictions": [sum(v) for v in zip(*(v for k, v in managed.items() if k.endswith("/evictions")), strict=True)],
        "seconds": time.perf_counter() - start,
    }


def delta_chain(days: Path, chain: Path, dtype: str) -> list[dict]:
    """Day 1's checkpoint exported in full, every later day as a delta on the day before: their sizes."""
    from recsys.export.exporter import export

    shutil.rmtree(chain, ignore_errors=True)
    chain.mkdir(parents=True)
    previous, sizes = None, []
    for i, ckpt in enumerate(sorted(days.glob("day-*.ckpt"), key=lambda p: int(p.stem.split("-")[1]))):
        previous = export(ckpt, chain / f"day{i + 1}", dtype, progress=False, since=previous)
        manifest = json.loads((previous / "manifest.json").read_text())
        sizes.append(
            {
                "name": previous.name,
                "kind": manifest["kind"],
                "bytes": sum(f["bytes"] for f in manifest["files"].values()),
                "changed_rows": sum(t.get("changed_rows", t["rows"]) for t in manifest["tables"]),
                "rows": sum(t["rows"] for t in manifest["tables"]),
            }
        )
    return sizes


def swap_latency(chain: Path, day_file: Path, clients: int = 4, batch: int = 256, gap: float = 5.0) -> dict:
    """``recsys serve --watch`` over the chain's full export, ``clients`` keep-alive clients scoring
    ``batch`` raw rows of ``day_file`` without pause, the deltas dropped in one every ``gap`` seconds:
    latency of the requests that overlap a swap (from a delta's arrival to its sequence going live,
    + 0.5 s) and of the others."""
    import http.client
    import threading

    import pyarrow.parquet as pq

    watch = chain.with_name("watch")
    shutil.rmtree(watch, ignore_errors=True)
    watch.mkdir()
    exports = sorted((p for p in chain.iterdir() if p.is_dir()), key=lambda p: int(p.name[3:]))
    shutil.copytree(exports[0], watch / exports[0].name)
    table = pq.read_table(day_file)
    bodies = [
        json.dumps(table.slice(i * batch, batch).to_pylist()).encode() for i in range(min(20, table.num_rows // batch))
    ]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [str(Path(sys.executable).parent / "recsys"), "serve", "--watch", str(watch), "--port", str(port)]
    server = subprocess.Popen(
        [*command, "--poll", "0.2", "--threads", "1", "--max-rows", str(batch)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def health() -> dict:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            response = conn.getresponse()
            return json.loads(response.read()) if response.status == 200 else {}
        except OSError:
            return {}

    try:
        while not health():
            time.sleep(0.1)
        records, stop, lock = [], threading.Event(), threading.Lock()

        def client(k: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            i = k
            while not stop.is_set():
                start = time.perf_counter()
                try:
                    conn.request("POST", "/score", body=bodies[i % len(bodies)])
                    response = conn.getresponse()
                    response.read()
                    status = response.status
                except (OSError, http.client.HTTPException):
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                    status = 0
                with lock:
                    records.append((start, time.perf_counter(), status))
                i += clients

        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        windows = []
        for sequence, delta in enumerate(exports[1:], start=1):
            time.sleep(gap)
            arrived = time.perf_counter()
            shutil.copytree(delta, watch / f".{delta.name}")
            (watch / f".{delta.name}").rename(watch / delta.name)
            while health().get("sequence") != sequence:
                time.sleep(0.02)
            windows.append((arrived, time.perf_counter()))
        time.sleep(gap)
        stop.set()
        for t in threads:
            t.join()
    finally:
        server.terminate()
        server.wait()

    def overlaps(start: float, end: float) -> bool:
        return any(start < live + 0.5 and end > arrived for arrived, live in windows)

    def summary(values: list[float]) -> dict:
        ms = np.array(values) * 1000 if values else np.array([np.nan])
        return {"requests": len(values), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}

    ok = [(a, b) for a, b, status in records if status == 200]
    return {
        "failed": sum(1 for *_, status in records if status != 200),
        "swaps": len(windows),
        "apply_s": [live - arrived for arrived, live in windows],
        "during": summary([b - a for a, b in ok if overlaps(a, b)]),
        "outside": summary([b - a for a, b in ok if not overlaps(a, b)]),
        "clients": clients,
        "batch": batch,
    }


def per_day(values: list[float]) -> list[float]:
    """Cumulative counters → the count of each day."""
    return [b - a for a, b in zip([0.0, *values[:-1]], values, strict=True)]


def plot(results: dict[str, list[dict]], days: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, runs in results.items():
        mean = [statistics.mean(r["next_day_auc"][d] for r in runs) for d in range(len(days))]
        ax.plot(range(len(days)), mean, marker="o", label=kind)
    ax.set_xticks(range(len(days)), [f"{d[5:]}→" for d in days], fontsize=8)
    ax.set_xlabel("day trained (AUC on the next day)")
    ax.set_ylabel(f"next-day AUC (mean of {len(next(iter(results.values())))} seeds)")
    ax.set_title("Drifting stream: ids that keep arriving, at equal embedding memory")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "data/stream")
    parser.add_argument("--rows-per-day", type=int, default=500_000, help="when the stream is generated")
    parser.add_argument("--days", default="2024-01-01:2024-01-07", help="the trained range (the day after is read too)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--out", type=Path, default=ROOT / "runs/bench_online")
    parser.add_argument("--dtype", default="int8", help="table dtype of the delta chain's exports")
    parser.add_argument("--doc", default=str(ROOT / "docs/benchmarks.md"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from recsys.data.datamodule import CTRDataModule
    from recsys.data.days import parse_days

    trained = parse_days(args.days)
    info = ensure_data(args.data, args.rows_per_day, len(trained) + 1)
    drifting = info["drifting_features"]
    raw = raw_copy(args.data, drifting)
    vocab = CTRDataModule(str(args.data), days=args.days).vocab
    rows = {f: vocab.num_embeddings(f) for f in drifting}
    kinds = blocks(rows)
    results: dict[str, list[dict]] = {}
    for kind in args.kinds:
        data = args.data if kind == "vocab" else raw
        for seed in args.seeds:
            run_dir = args.out / f"{kind}-seed{seed}"
            config = (ROOT / "configs/stream/base.yaml").read_text()
            chained = kind == "managed" and seed == args.seeds[0]  # its days become a delta chain
            parts = [kind, kinds[kind], str(data), args.days, seed, config, chained]
            job = (kind, kinds[kind], data, args.days, seed, run_dir, chained)
            result = reused_or_run(run_dir, parts, lambda job=job: fit(*job))
            print(f"[bench_online] {kind} seed {seed}: next-day AUC {[round(a, 4) for a in result['next_day_auc']]}")
            results.setdefault(kind, []).append(result)

    def mean_std(values: list[float]) -> str:
        if len(values) == 1:
            return f"{values[0]:.4f}"
        return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"

    header = "| kind | memory (MB) | mean next-day AUC | " + " | ".join(f"{d[5:]}→" for d in trained)
    header += " | samples/s (median) | RSS day 1 → last (MiB) | admissions / evictions per day |"
    lines = [header, "|---|---:|---:|" + "---:|" * len(trained) + "---:|---:|---|"]
    for kind, runs in results.items():
        daily = [statistics.mean(r["next_day_auc"][d] for r in runs) for d in range(len(trained))]
        rate = statistics.median(x for r in runs for x in r["samples_per_s"][1:] or r["samples_per_s"])
        first, last = (statistics.mean(r["rss_mib"][i] for r in runs) for i in (0, -1))
        rss = f"{first:,.0f} → {last:,.0f}"
        churn = "—"
        if runs[0]["admissions"]:
            adm = [statistics.mean(per_day(r["admissions"])[d] for r in runs) for d in range(len(trained))]
            ev = [statistics.mean(per_day(r["evictions"])[d] for r in runs) for d in range(len(trained))]
            churn = ", ".join(f"{a:,.0f}/{e:,.0f}" for a, e in zip(adm, ev, strict=True))
        lines.append(
            f"| {kind} | {memory_bytes(kind, kinds[kind], rows) / 1e6:.2f} | "
            f"{mean_std([statistics.mean(r['next_day_auc']) for r in runs])} | "
            + " | ".join(f"{a:.4f}" for a in daily)
            + f" | {rate:,.0f} | {rss} | {churn} |"
        )
    plot(results, trained, ROOT / "docs/online_auc.png")
    serving = []
    if "managed" in results:
        run_dir = args.out / f"managed-seed{args.seeds[0]}"
        sizes = delta_chain(run_dir / "days", run_dir / "chain", args.dtype)
        from recsys.data.arrow import split_files
        from recsys.data.days import day_split, next_day

        day_file = split_files(args.data, day_split(next_day(trained[-1])))[0]
        swap = swap_latency(run_dir / "chain", day_file)
        full = sizes[0]["bytes"]
        slots = sum(e["capacity"] - 1 for e in kinds["managed"]["features"].values())
        daily = statistics.mean(x for r in results["managed"] for x in per_day(r["admissions"])[1:])
        turnover = (
            f"The managed tables admit {daily:,.0f} ids a day (after day 1, mean over seeds) into {slots:,} "
            f"slots (admissions a day: {daily / slots:.0%} of the slots; LRU turns the tables over every day), "
            "so a day's delta holds about every row; deltas pay off where most rows stay untouched between "
            "exports (shorter intervals, tables larger than a day's ids)."
        )
        serving = [
            "",
            f"Deltas (`recsys export --since`, {args.dtype}, managed run of seed {args.seeds[0]}: day 1 in full, "
            "each later day on the day before): "
            + ", ".join(
                f"{d['name']} {d['bytes'] / 1e6:.2f} MB ({d['bytes'] / full:.0%} of the full export; "
                f"{d['changed_rows'] / d['rows']:.0%} of rows changed)"
                for d in sizes[1:]
            )
            + f"; the full export is {full / 1e6:.2f} MB (its vocabularies included). {turnover}",
            "",
            f"Hot swap (`recsys serve --watch`, 1 torch thread, {swap['clients']} keep-alive clients on 127.0.0.1 "
            f"sending {swap['batch']} raw rows of the test day without pause; the {swap['swaps']} deltas dropped "
            f"in one every 5 s): {swap['failed']} failed requests; applying a delta took "
            f"{min(swap['apply_s']):.2f}–{max(swap['apply_s']):.2f} s (arrival to its sequence live); requests "
            f"overlapping a swap: {swap['during']['requests']}, p50 {swap['during']['p50_ms']:.0f} ms, p99 "
            f"{swap['during']['p99_ms']:.0f} ms; the others: {swap['outside']['requests']}, p50 "
            f"{swap['outside']['p50_ms']:.0f} ms, p99 {swap['outside']['p99_ms']:.0f} ms.",
        ]
    days_info = info["days"]
    new = [statistics.mean(d["new_id_share"]) for d in days_info[1 : len(trained) + 1]]
    shown = args.data.relative_to(ROOT) if args.data.is_relative_to(ROOT) else args.data
    md = "\n".join(
        [
            "## Online training on a drifting stream (`scripts/bench_online.py`)",
            "",
            f"`python scripts/bench_online.py --data {shown} "
            f"--days {args.days} --seeds {' '.join(map(str, args.seeds))}` — {machine()}, "
            f"{torch.get_num_threads()} torch threads; {time.strftime('%Y-%m-%d')}. Data: "
            f"`datasets/synthetic/stream.py`, {days_info[0]['rows']:,} rows a day; each day a share of the "
            f"{len(drifting)} drifting features' catalogues is renewed (of a day's distinct ids, "
            f"{min(new):.0%}–{max(new):.0%} are new), planted AUC {days_info[1]['planted_auc']:.3f}. "
            "One epoch per day (`configs/stream/base.yaml`: EmbeddingMLP, Adagrad 0.02, batch 4096); the AUC "
            "of day d is the model after day d scored on day d+1 (val, no checkpoint chosen; the last column "
            "is the test day). Memory: the drifting features' tables (+ 40 B per managed slot), the same for "
            f"every kind (vocab rows of day 1: {sum(rows.values()):,}). Managed: admit after 2 sightings, LRU, "
            "every step, set before the runs. Mean ± std over seeds of each run's mean over days; per-day "
            "columns are means over seeds.",
            "",
            *lines,
            "",
            "![next-day AUC per day](online_auc.png)",
            *serving,
        ]
    )
    write_doc_section(args.doc, "bench_online", md)
    print(f"[bench_online] wrote {args.doc}")


if __name__ == "__main__":
    main()
