"""Exported tables per dtype: parity, test AUC, table bytes, and HTTP serving throughput/latency.

    python scripts/bench_serving.py                       # base + DIN on ml100k-ctr, fp32/fp16/int8/int4
    python scripts/bench_serving.py --models base --requests 100 --clients 2 --batch 128

For each model (trained with its config into runs/bench_serving/<model>, reused while its configs,
seed and prepared data are unchanged):
export at each dtype; score the ml100k-ctr test split with the export (max |Δp| vs the trained
model, test AUC); table bytes on disk and held by the FBGEMM kernels; then start
``recsys serve`` in its own process on 127.0.0.1 and send ``--requests`` POST /score requests of
``--batch`` raw test rows from ``--clients`` concurrent keep-alive connections (stopping early
after ``--seconds``): throughput and p50/p99 latency. Client and server share the machine.
Writes runs/bench_serving/results.json and the ``bench_serving`` block of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from benchdoc import machine, reused_or_run, write_doc_section

from recsys.data.datamodule import CTRDataModule
from recsys.eval.metrics import auc
from recsys.eval.report import predict_split
from recsys.export.exporter import export
from recsys.export.loader import load
from recsys.train.checkpoint import load_model
from recsys.train.cli import run

CONFIGS = {"base": ["configs/movielens/base.yaml"], "din": ["configs/movielens/din.yaml"]}
OUT = Path("runs/bench_serving")
DTYPES = ["fp32", "fp16", "int8", "int4"]


def checkpoint(name: str) -> Path:
    """The model trained with ``CONFIGS[name]`` (seed 1), reused when config and data are unchanged."""

    def train() -> dict:
        args = ["fit"] + [a for c in CONFIGS[name] for a in ("--config", c)]
        args += ["--seed_everything", "1", "--trainer.enable_progress_bar", "false"]
        args += ["--trainer.logger.init_args.save_dir", str(OUT), "--trainer.logger.init_args.name", ""]
        cli = run(args + ["--trainer.logger.init_args.version", name])
        return {"ckpt": cli.trainer.checkpoint_callback.best_model_path}

    prepared = Path("data/ml100k-ctr/PREPARED.json")
    parts = [[Path(c).read_text() for c in CONFIGS[name]], 1, prepared.read_text() if prepared.exists() else ""]
    return Path(reused_or_run(OUT / name, parts, train)["ckpt"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_test(
    directory: Path,
    port: int,
    bodies: list[bytes],
    requests: int,
    clients: int,
    seconds: float,
    expected: list[np.ndarray] | None = None,
) -> dict:
    """``requests`` POST /score from ``clients`` keep-alive connections. A failed request is any answer
    but 200, or a connection error (the client reconnects); with ``expected`` (the export's own scores
    of each body), the largest |Δ| of the scores that came back over JSON."""
    latencies: list[float] = []
    errors: list[str] = []
    worst = [0.0]
    counter = iter(range(requests))
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while time.perf_counter() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            start = time.perf_counter()
            try:
                conn.request(
                    "POST", "/score", body=bodies[i % len(bodies)], headers={"Content-Type": "application/json"}
                )
                response = conn.getresponse()
                payload = response.read()
                status = response.status
            except (OSError, http.client.HTTPException) as err:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                with lock:
                    errors.append(type(err).__name__)
                continue
            elapsed = time.perf_counter() - start
            with lock:
                if status != 200:
                    errors.append(str(status))
                    continue
                latencies.append(elapsed)
                if expected is not None:
                    got = np.array(json.loads(payload)["scores"])
                    worst[0] = max(worst[0], float(np.abs(got - expected[i % len(bodies)]).max()))
        conn.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "error_kinds": sorted(set(errors)),
        "seconds": wall,
        "requests_per_s": len(latencies) / wall,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "json_max_abs_diff": worst[0] if expected is not None else None,
    }


def start_server(directory: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, int]:
    """``recsys serve`` in its own process, once ``/healthz`` answers 200 (it can score)."""
    port = free_port()
    recsys = Path(sys.executable).parent / "recsys"
    server = subprocess.Popen(
        [
            str(recsys),
            "serve",
            str(directory),
            "--port",
            str(port),
            "--max-rows",
            str(args.batch),
            "--threads",
            str(args.server_threads),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for _ in range(600):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return server, port
        except OSError:
            pass
        time.sleep(0.1)
    server.terminate()
    raise RuntimeError(f"recsys serve {directory} did not come up")


def serve_and_load(
    directory: Path, bodies: list[bytes], args: argparse.Namespace, expected: list[np.ndarray] | None = None
) -> dict:
    server, port = start_server(directory, args)
    try:
        load_test(directory, port, bodies, min(20, args.requests), args.clients, args.seconds)  # warm-up
        return load_test(directory, port, bodies, args.requests, args.clients, args.seconds, expected)
    finally:
        server.terminate()
        server.wait(timeout=30)


def sweep(name: str, args: argparse.Namespace) -> list[dict]:
    """One int8 export under 1, 4, 16, 64... concurrent clients: rows/s, p50/p99, failed requests, and
    the JSON path's scores against the export's own (parity on the path that is timed)."""
    out = export(checkpoint(name), OUT / "exports" / f"{name}-int8-sweep", "int8", force=True, progress=False)
    bodies, expected = _bodies(load(out), args.batch)
    server, port = start_server(out, args)
    rows = []
    try:
        load_test(out, port, bodies, 20, 4, args.seconds)  # warm-up
        for clients in args.sweep:
            result = load_test(out, port, bodies, max(args.requests, 4 * clients), clients, args.seconds, expected)
            result |= {"model": name, "clients": clients, "rows_per_s": result["requests_per_s"] * args.batch}
            print(json.dumps(result))
            rows.append(result)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return rows


def _bodies(scorer, batch: int) -> tuple[list[bytes], list[np.ndarray]]:  # noqa: ANN001
    """Request bodies of ``batch`` raw test rows (as stored, extra columns included) and the export's scores of each."""
    raw = pq.read_table("data/ml100k-ctr/test/part-0.parquet").to_pylist()
    chunks = [raw[i : i + batch] for i in range(0, len(raw) - batch, batch)]
    return [json.dumps(c).encode() for c in chunks], [scorer.score(c) for c in chunks]


def bench_model(name: str, args: argparse.Namespace) -> list[dict]:
    ckpt = checkpoint(name)
    model = load_model(ckpt)
    dm = CTRDataModule("data/ml100k-ctr", eval_batch_size=4096)
    reference = predict_split(model, dm.stream("test"), desc=f"{name} trained")
    rows = []
    for dtype in args.dtypes:
        out = export(ckpt, OUT / "exports" / f"{name}-{dtype}", dtype, force=True, progress=False)
        scorer = load(out)
        probs = np.concatenate([scorer.score_batch(b) for b in dm.stream("test")])
        bodies, expected = _bodies(scorer, args.batch)
        manifest = scorer.manifest
        result = {
            "model": name,
            "dtype": dtype,
            "max_abs_diff": float(np.abs(probs - reference["prob"]).max()),
            "test_auc": auc(reference["label"], probs),
            "trained_test_auc": auc(reference["label"], reference["prob"]),
            "table_bytes_disk": sum(manifest["files"][t["file"]]["bytes"] for t in manifest["tables"]),
            "table_bytes_rows": sum(t["rows"] * t["row_bytes"] for t in manifest["tables"]),
            "table_bytes_memory": scorer.table_bytes_in_memory,
            **serve_and_load(out, bodies, args, expected),
        }
        result["rows_per_s"] = result["requests_per_s"] * args.batch
        print(json.dumps(result))
        rows.append(result)
    return rows


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"`python scripts/bench_serving.py` — {machine()}; server `recsys serve` in its own process with "
        f"{args.server_threads} torch thread(s), {args.clients} "
        "concurrent keep-alive clients on 127.0.0.1 (same 2 cores), "
        f"{args.requests} requests of {args.batch} raw ml100k-ctr test rows each (JSON), after 20 warm-up requests. "
        "Parity and AUC over the whole test split (10,439 rows) scored through the export; table bytes: rows as stored "
        "(D·bits/8, + 4 bytes fp16 scale/bias per row for int8/int4), "
        "files on disk (+ safetensors headers), and what the "
        "FBGEMM inference kernels hold.",
        "",
        "| model | dtype | max abs Δp vs trained | test AUC (trained) | table bytes: rows / disk "
        "/ in kernels | vs fp32 | requests/s | rows/s | p50 ms | p99 ms | failed | JSON Δ |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        fp32 = next(x for x in rows if x["model"] == r["model"] and x["dtype"] == "fp32")["table_bytes_rows"]
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['max_abs_diff']:.1e} "
            f"| {r['test_auc']:.4f} ({r['trained_test_auc']:.4f}) | "
            f"{r['table_bytes_rows']:,} / {r['table_bytes_disk']:,} / {r['table_bytes_memory']:,} | "
            f"{r['table_bytes_rows'] / fp32:.2f}× | {r['requests_per_s']:.0f} | {r['rows_per_s']:,.0f} | "
            f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | {r['json_max_abs_diff']:.1e} |"
        )
    return "\n".join(lines)


def sweep_markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"`python scripts/bench_serving.py --sweep {' '.join(map(str, args.sweep))}` — {machine()}; one `recsys serve` "
        "process (defaults: 8 workers, a queue of 64, backlog "
        f"1024; {args.server_threads} torch thread(s)) serving the "
        f"int8 export of `{rows[0]['model'] if rows else '-'}`; "
        "clients on 127.0.0.1 on the same 2 cores, each a keep-alive "
        f"connection sending requests of {args.batch} raw test rows as stored (extra columns included, answered under "
        f"`ignored_fields`). Failed = any answer but 200 or a connection error. JSON Δ: the largest difference between "
        f"the scores that came back over HTTP and the export's own scores of the same rows.",
        "",
        "| clients | requests | failed | rows/s | p50 ms | p99 ms | JSON Δ |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['clients']} | {r['requests'] + r['errors']} | {r['errors']} | {r['rows_per_s']:,.0f} | "
            f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['json_max_abs_diff']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--dtypes", nargs="+", default=DTYPES, choices=DTYPES)
    parser.add_argument("--requests", type=int, default=300, help="requests per dtype (bounded)")
    parser.add_argument("--seconds", type=float, default=60.0, help="time limit per dtype")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--batch", type=int, default=256, help="rows per request")
    parser.add_argument("--server-threads", type=int, default=1)
    parser.add_argument(
        "--sweep",
        nargs="*",
        type=int,
        default=[],
        help="concurrency sweep (clients per level, e.g. 1 4 16 64) on the first model's int8 export",
    )
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    if "fp32" not in args.dtypes:
        args.dtypes = ["fp32", *args.dtypes]
    torch.set_num_threads(1)
    if args.sweep:
        swept = sweep(args.models[0], args)
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "sweep.json").write_text(json.dumps(swept, indent=2))
        text = sweep_markdown(swept, args)
        print(text)
        if not args.no_doc:
            write_doc_section("docs/benchmarks.md", "bench_serving_sweep", text)
        return
    rows = [r for name in args.models for r in bench_model(name, args)]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(rows, indent=2))
    text = markdown(rows, args)
    print(text)
    if not args.no_doc:
        write_doc_section("docs/benchmarks.md", "bench_serving", text)
    shutil.rmtree(OUT / "exports", ignore_errors=True)


if __name__ == "__main__":
    main()
